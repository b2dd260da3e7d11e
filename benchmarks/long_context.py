"""Long prompts on CPU: prefill time and compiled memory, the dense attention kernel against the default.

Two parts, each a comparison measured in the same run:

1. **Time, a few layers at full width.** The language model of ``minicpmv_2_6()`` cut to ``--layers``
   decoder layers (width 3584, 28 query / 4 KV heads, MLP 18944; the vocabulary cut to ``--vocab`` to
   keep the embedding small: it is only gathered, and ``lm_head`` runs on the last position), random
   float32 weights, batch 1. For each prompt length T up to ``--time-max``, generation's own prefill
   program (``generate.prefill``: embeddings, every layer into a cache of T + 16 slots, the last
   position's logits) runs with

   * ``today``: ``attention="xla"`` (the dense kernel: ``[B, N, T, S]`` float32 logits per layer) and the
     prompt in one pass — what the code did before the blockwise kernel;
   * ``default``: ``attention="auto"`` (on CPU: the blockwise kernel for prefills) and
     ``PREFILL_CHUNK`` chunking (a prompt longer than the chunk runs in chunks).

   The first call (compile + run) is reported apart; then ``--repeats`` calls of each, alternating, and
   the medians are compared. The next-token logits of both must agree (``--tol``) or the run fails.
2. **Memory, the full-size model.** ``compiled_plan.compiled_memory`` compiles the full 8B prefill (all 28
   layers, full vocabulary, float32, batch 1, one device, weights abstract: nothing materialised) at
   each T of ``--lengths`` for both variants and reads XLA's temporaries. Goal: the default's
   temporaries at T = 16384 at most 6× those at 4096, and at most 8 GiB.

    python benchmarks/long_context.py [--layers 2] [--lengths 1024,2048,4096,8192,16384] [--time-max 4096]
                                      [--repeats 3] [--vocab 32768] [--skip-time] [--skip-memory] [--out r.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np

VARIANTS = {"today": dict(attention="xla", prefill_chunk=None), "default": dict(attention="auto", prefill_chunk="default")}


def _chunk(value, generate):
    return generate.PREFILL_CHUNK if value == "default" else value


def time_prefill(layers: int, lengths: list[int], repeats: int, vocab: int, tol: float) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax import generate
    from minicpmv_jax.config import minicpmv_2_6
    from minicpmv_jax.generation_config import GenerationConfig
    from minicpmv_jax.model import MiniCPMVModel

    full = minicpmv_2_6()
    cfg = dataclasses.replace(full, llm=dataclasses.replace(full.llm, num_hidden_layers=layers, vocab_size=vocab))
    t0 = time.perf_counter()
    model = MiniCPMVModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    print(f"model: {layers} decoder layers at full width, vocabulary {vocab}, float32 "
          f"({time.perf_counter() - t0:.1f} s to build)", flush=True)
    config = GenerationConfig(max_new_tokens=16)
    rows = []
    for t in lengths:
        ids = jax.random.randint(jax.random.key(t), (1, t), 0, vocab, jnp.int32)
        prepared = generate.PreparedBatch(ids, jnp.ones((1, t), bool), jnp.ones((1,), bool), batch_size=1)
        runs, first, logits = {}, {}, {}
        for name, variant in VARIANTS.items():
            model.llm.attention = variant["attention"]
            chunk = _chunk(variant["prefill_chunk"], generate)
            start = time.perf_counter()
            state = generate.prefill(model, prepared, config, prefill_chunk=chunk)
            logits[name] = np.asarray(state.logits)
            first[name] = time.perf_counter() - start
            runs[name] = []
        for i in range(repeats):
            order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
            for name in order:
                model.llm.attention = VARIANTS[name]["attention"]
                chunk = _chunk(VARIANTS[name]["prefill_chunk"], generate)
                start = time.perf_counter()
                jax.block_until_ready(generate.prefill(model, prepared, config, prefill_chunk=chunk).logits)
                runs[name].append(time.perf_counter() - start)
        err = float(np.abs(logits["default"] - logits["today"]).max() / np.abs(logits["today"]).max())
        row = {"T": t, **{f"{n}_s": statistics.median(r) for n, r in runs.items()},
               **{f"{n}_first_s": f for n, f in first.items()}, "logits_rel_err": err}
        row["speedup"] = row["today_s"] / row["default_s"]
        rows.append(row)
        print(f"T={t:6d}  today (xla, one pass) {row['today_s']:8.2f} s   default (auto, chunked) "
              f"{row['default_s']:8.2f} s   today/default {row['speedup']:.2f}x   logits rel err {err:.1e}", flush=True)
        if err > tol:
            raise SystemExit(f"T={t}: the variants' logits differ by {err:.2e} > --tol {tol}")
    model.llm.attention = "auto"
    return rows


def compiled_temps(lengths: list[int]) -> list[dict]:
    from minicpmv_jax import generate
    from minicpmv_jax.compiled_plan import compiled_memory

    rows = []
    for t in lengths:
        row = {"T": t}
        for name, variant in VARIANTS.items():
            r = compiled_memory("minicpmv-2_6", prompt_len=t, dtype="float32", attention=variant["attention"],
                                prefill_chunk=_chunk(variant["prefill_chunk"], generate))
            row[f"{name}_temp_gib"] = r.prefill.temp_bytes / 2 ** 30
            row[f"{name}_compile_s"] = r.prefill.compile_s
        rows.append(row)
        print(f"T={t:6d}  full-size prefill temporaries: today {row['today_temp_gib']:8.2f} GiB   "
              f"default {row['default_temp_gib']:6.2f} GiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--time-max", type=int, default=4096, help="time prefills up to this length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    result = {}
    if not args.skip_time:
        result["time"] = time_prefill(args.layers, [t for t in lengths if t <= args.time_max], args.repeats,
                                      args.vocab, args.tol)
    if not args.skip_memory:
        mem = compiled_temps(lengths)
        result["memory"] = mem
        by_t = {r["T"]: r for r in mem}
        if 4096 in by_t and 16384 in by_t:
            ratio = by_t[16384]["default_temp_gib"] / by_t[4096]["default_temp_gib"]
            result["goal"] = {"temp_16k_over_4k": ratio, "temp_16k_gib": by_t[16384]["default_temp_gib"],
                              "met": ratio <= 6 and by_t[16384]["default_temp_gib"] <= 8}
            print(f"goal: temporaries 16k/4k = {ratio:.2f} (≤ 6), at 16k {by_t[16384]['default_temp_gib']:.2f} GiB "
                  f"(≤ 8): {'met' if result['goal']['met'] else 'NOT met'}")
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
