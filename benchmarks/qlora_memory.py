"""Peak host memory of a LoRA train step over a bfloat16 base against QLoRA over an int8 / int4 base, at the
Qwen2-0.5B shape, on CPU.

The model: a Qwen2-0.5B-shaped language model (24 layers, hidden 896, 14 / 2 heads, MLP 4864, vocabulary
151 936, untied ``lm_head``) with the tests' tiny vision tower, random weights with the tests' spread
(``minicpmv_jax.testing.checkpoint``), written once as a bfloat16 HF-layout checkpoint. Every variant loads
it with ``MiniCPMV.from_pretrained(folder, dtype="bfloat16", quantize=...)`` (int8 / int4: quantized
tensor by tensor while loading) and trains the same LoRA adapters (rank 8 on q/k/v/o, float32, the
``finetune`` defaults) with ``minicpmv_jax.finetune.Trainer``: bfloat16 computation, rematerialised
layers, the chunked loss, AdamW; one text batch of ``--batch`` × ``--seq`` random tokens:

* ``lora-bf16``: LoRA over the bfloat16 model;
* ``qlora-int8`` / ``qlora-int4``: the same adapters over ``quantize="int8"`` / ``"int4"``.

Each variant runs in its own process (one CPU device): *runtime* is its resident size with JAX imported
and one program compiled; *load* the resident high-water mark (``VmHWM``) once the model is loaded,
*before* the resident size once the trainer and its state exist, *first step* the high-water mark up to
the end of the first train step (the step compiled and run), *steady* the high-water mark over
``--repeats`` more steps (reset just before them): weights, adapters, optimizer state and the step's
buffers. All are reported above the runtime. The resident sizes include what the allocator keeps of
freed memory (loading's buffers, the compiler's); XLA's own plan of the compiled step is reported too
(``memory_analysis``: its arguments — the frozen base, the train state, the batch — and its temporaries),
which has no such noise. *Parameter bytes*
count the language model's parameters with an int4 element as half a byte (XLA:CPU packs int4 arrays two
values per byte too: 2 × 512 M int4 elements take 517 MiB resident, as int8 1026 MiB).

    python benchmarks/qlora_memory.py [--layers N] [--seq L] [--batch B] [--repeats R] [--variants V,...]
                                      [--small] [--out result.json]

``--small`` (2 layers, 64 tokens, 1 steady step) checks that every variant runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from common import qwen2_05b, reset_peak, status_kib  # noqa: E402

VARIANTS = {"lora-bf16": None, "qlora-int8": "int8", "qlora-int4": "int4"}


def _batch(args, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    loss_mask = np.ones_like(ids, bool)
    loss_mask[:, 0] = False
    empty = [np.zeros((0, 2), np.int32)] * args.batch
    return {"input_ids": ids, "attention_mask": np.ones_like(ids, bool), "loss_mask": loss_mask,
            "image_bound": empty, "pixel_values": [[] for _ in range(args.batch)], "tgt_sizes": empty,
            "image_sizes": [[] for _ in range(args.batch)], "sample_ids": [f"s{i}" for i in range(args.batch)]}


def _param_bytes(model) -> dict:
    """The language model's parameter bytes (int4 as half a byte) by kind: projections, the rest."""
    import jax.numpy as jnp
    from flax import nnx

    out = {"projections": 0, "other": 0}
    for path, var in nnx.to_flat_state(nnx.state(model.llm, nnx.Param)):
        value = var.get_value()
        bits = 4 if value.dtype == jnp.int4 else 8 * value.dtype.itemsize
        kind = "projections" if path[0] == "layers" and path[-1] in ("kernel", "scale") else "other"
        out[kind] += value.size * bits // 8
    return out


def _worker(args) -> None:
    """One variant in this process; prints its result as JSON on the last line."""
    import jax
    from flax import nnx

    import minicpmv_jax.finetune.train_step  # noqa: F401
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.zeros(4, np.float32)))
    runtime = status_kib("VmRSS")

    from minicpmv_jax import MiniCPMV
    from minicpmv_jax.finetune import LoRAConfig, TrainConfig, Trainer, describe_trainable

    t0 = time.perf_counter()
    model = MiniCPMV.from_pretrained(args.folder, dtype="bfloat16", quantize=VARIANTS[args.worker])
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    load_s, load_peak = time.perf_counter() - t0, status_kib("VmHWM")
    param_bytes = _param_bytes(model)
    config = TrainConfig(learning_rate=1e-4, total_steps=1000, compute_dtype="bfloat16", remat=True,
                         train_resampler=False, lora=LoRAConfig(rank=8, alpha=16.0))
    trainer = Trainer(model, config)
    del model
    batch = trainer.put_batch([_batch(args, trainer.model_config.llm.vocab_size)])
    state = trainer.init_state()
    trainable = describe_trainable(state.params)
    before = status_kib("VmRSS")
    # XLA's own plan of the compiled step: its arguments (frozen base, train state, batch) and temporaries.
    plan = trainer._program("train", batch).lower(state, trainer.frozen, trainer.rest, batch).compile()
    plan = plan.memory_analysis()
    xla = {"arguments_mib": plan.argument_size_in_bytes / 2**20, "temporaries_mib": plan.temp_size_in_bytes / 2**20}

    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    first_loss = float(jax.block_until_ready(metrics["loss"]))
    first_s, first_peak = time.perf_counter() - t0, status_kib("VmHWM")
    reset_peak()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    steady_peak = status_kib("VmHWM")
    mib = 1024
    print(json.dumps({"variant": args.worker, "runtime_mib": runtime / mib, "load_mib": (load_peak - runtime) / mib,
                      "first_mib": (first_peak - runtime) / mib, "steady_mib": (steady_peak - runtime) / mib,
                      "before_step_mib": (before - runtime) / mib, **xla, "load_s": load_s, "first_step_s": first_s, "times_s": times, "first_loss": first_loss,
                      "param_bytes": param_bytes, "trainable": trainable}))


def _run(variant: str, folder: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--folder", folder,
           "--seq", str(args.seq), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)                       # one CPU device, no simulated mesh
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="steady steps per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--small", action="store_true", help="2 layers, 64 tokens, 1 steady step: a quick check")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: expected names among {list(VARIANTS)}, got {args.variants!r}")
    if args.small:
        args.layers, args.seq, args.repeats = 2, 64, 1

    from minicpmv_jax.testing.checkpoint import write_checkpoint

    cfg = qwen2_05b(args.layers)
    with tempfile.TemporaryDirectory(prefix="qlora_memory_") as folder:
        tensors = write_checkpoint(folder, cfg, seed=0, num_shards=2, dtype="bfloat16", tokenizer=False)
        llm_params = sum(t.size for name, t in tensors.items() if name.startswith("llm."))
        del tensors
        results = {v: _run(v, folder, args) for v in variants}
    _report(args, cfg, llm_params, results)


def _report(args, cfg, llm_params: int, results: dict) -> None:
    import jax

    llm = cfg.llm
    print(f"model: Qwen2-0.5B shape, {llm.num_hidden_layers} layers, width {llm.hidden_size}, "
          f"{llm.num_attention_heads}/{llm.num_key_value_heads} heads, MLP {llm.intermediate_size}, vocab "
          f"{llm.vocab_size}: {llm_params / 1e6:.0f} M LLM parameters; LoRA rank 8 on q/k/v/o "
          f"({next(iter(results.values()))['trainable']}); batch {args.batch}×{args.seq} tokens; bfloat16 "
          f"computation, remat, chunked loss; jax {jax.__version__}, {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.2f}")
    base = results.get("lora-bf16")
    print(f"{'variant':<11} {'LLM MiB':>8} {'(proj.)':>8} {'XLA args':>8} {'XLA temp':>8} {'load MiB':>8} "
          f"{'before':>7} {'1st-step MiB':>12} {'steady MiB':>10} {'vs bf16':>8} {'load s':>6} {'1st step s':>10} "
          f"{'step s':>6} {'1st loss':>8}")
    for variant, r in results.items():
        b = r["param_bytes"]
        ratio = f"{r['steady_mib'] / base['steady_mib']:.2f}x" if base else "-"
        print(f"{variant:<11} {(b['projections'] + b['other']) / 2**20:>8.0f} {b['projections'] / 2**20:>8.0f} "
              f"{r['arguments_mib']:>8.0f} {r['temporaries_mib']:>8.0f} {r['load_mib']:>8.0f} "
              f"{r['before_step_mib']:>7.0f} {r['first_mib']:>12.0f} {r['steady_mib']:>10.0f} {ratio:>8} "
              f"{r['load_s']:>6.1f} {r['first_step_s']:>10.1f} {statistics.median(r['times_s']):>6.2f} "
              f"{r['first_loss']:>8.4f}")
    print(f"(runtime {next(iter(results.values()))['runtime_mib']:.0f} MiB resident before the model; all MiB "
          "below are above it. LLM MiB: the language model's parameter bytes, int4 as half a byte; proj.: its "
          "quantizable projections. XLA args / temp: the compiled train step's arguments (frozen base, train "
          "state, batch) and temporaries as XLA plans them. load / 1st-step / steady MiB: resident high-water marks "
          "after loading, up to the end of the first train step, over the steady steps; before: resident just "
          "before the first step)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "llm_params": llm_params, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
