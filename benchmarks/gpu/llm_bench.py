"""Full-size Qwen2-7B (MiniCPM-V 2.6's language model) timing: JAX vs transformers, same run, same card.

Measures, with random bfloat16 weights of the released shapes:
  * prefill of a P-token prompt at batch 1 (time, tokens/s),
  * one decode step against a KV cache of P + steps slots, at batch 1 and 8 (ms/step, tokens/s),
  * the memory-bandwidth floor of a decode step: (weight bytes + KV bytes read) / copy bandwidth
    measured on the same device.
Each framework runs in its own subprocess (JAX preallocation and the torch caching allocator do not
share a card well). ``--small`` runs a tiny configuration on CPU so the script never rots.

The decode step here is a jitted single step driven from Python; the compiled while-loop generation
arrives with the generation work and will be timed by the same script.

    python benchmarks/gpu/llm_bench.py [--small] [--prompt 2048] [--steps 32] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _config(small: bool):
    from minicpmv_jax.config import minicpmv_2_6, tiny
    return (tiny(vocab_size=4099, num_layers=2) if small else minicpmv_2_6()).llm


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------- JAX


def run_jax(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax import qwen2
    from minicpmv_jax.kv_cache import KVCache

    cfg = _config(args.small)
    t0 = time.perf_counter()
    model = qwen2.Qwen2(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    out = {"device": str(jax.devices()[0].device_kind), "init_s": time.perf_counter() - t0,
           "param_bytes": param_bytes, "jax": jax.__version__}

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def prefill(graphdef, state, cache, ids):
        m = nnx.merge(graphdef, state)
        b, t = ids.shape
        valid = jnp.arange(cache.length)[None, :] < t
        mask = qwen2.attention_mask(jnp.broadcast_to(valid, (b, cache.length)), 0, t)
        pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        h, cache = m.hidden_states(m.embed(ids), pos, mask, cache, jnp.int32(0))
        return m.logits(h[:, -1:]), cache

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def decode(graphdef, state, cache, tok, index):
        m = nnx.merge(graphdef, state)
        b = tok.shape[0]
        valid = jnp.broadcast_to(jnp.arange(cache.length)[None, :] <= index, (b, cache.length))
        mask = qwen2.attention_mask(valid, index, 1)
        pos = jnp.full((b, 1), index, jnp.int32)
        h, cache = m.hidden_states(m.embed(tok), pos, mask, cache, index)
        logits = m.logits(h)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache

    p, steps = args.prompt, args.steps
    slots = p + steps
    # Prefill, batch 1.
    ids = jax.random.randint(jax.random.key(1), (1, p), 0, cfg.vocab_size, jnp.int32)
    cache = KVCache.zeros(cfg, 1, slots, jnp.bfloat16)
    t = time.perf_counter()
    logits, cache = prefill(graphdef, state, cache, ids)
    jax.block_until_ready(logits)
    out["prefill_compile_s"] = time.perf_counter() - t

    def one_prefill():
        nonlocal cache
        lg, cache = prefill(graphdef, state, cache, ids)
        jax.block_until_ready(lg)

    out["prefill_s"] = _median_time(one_prefill, args.repeats)
    out["prefill_tok_s"] = p / out["prefill_s"]

    for b in args.batches:
        cache = KVCache.zeros(cfg, b, slots, jnp.bfloat16)
        tok = jnp.zeros((b, 1), jnp.int32)
        tok, cache = decode(graphdef, state, cache, tok, jnp.int32(p))   # compile
        jax.block_until_ready(tok)
        t = time.perf_counter()
        for s in range(steps):
            tok, cache = decode(graphdef, state, cache, tok, jnp.int32(p + s))
        jax.block_until_ready(tok)
        dt = (time.perf_counter() - t) / steps
        kv_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
        out[f"decode_b{b}_ms"] = dt * 1e3
        out[f"decode_b{b}_tok_s"] = b / dt
        out[f"kv_b{b}_bytes"] = kv_bytes
        del cache

    # Copy bandwidth on this device: read + write of a large buffer.
    n = (256 if args.small else 4096) * 2 ** 20 // 2
    buf = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 2)
    jax.block_until_ready(copy(buf))
    dt = _median_time(lambda: jax.block_until_ready(copy(buf)), 10)
    out["copy_bw_GBs"] = 2 * buf.nbytes / dt / 1e9
    return out


# --------------------------------------------------------------------------- torch


def run_torch(args) -> dict:
    import torch
    import transformers

    cfg = _config(args.small)
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    hc = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="sdpa")
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(hc)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.02)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__}
    p, steps = args.prompt, args.steps
    ids = torch.randint(0, cfg.vocab_size, (1, p), device=device)
    with torch.no_grad():
        model(ids, use_cache=True)
        sync()

        def one_prefill():
            model(ids, use_cache=True)
            sync()

        out["prefill_s"] = _median_time(one_prefill, args.repeats)
        out["prefill_tok_s"] = p / out["prefill_s"]
        for b in args.batches:
            prompt = torch.randint(0, cfg.vocab_size, (b, p), device=device)
            res = model(prompt, use_cache=True)
            past = res.past_key_values
            tok = res.logits[:, -1:].argmax(-1)
            res = model(tok, past_key_values=past, use_cache=True)   # warm-up step
            past, tok = res.past_key_values, res.logits[:, -1:].argmax(-1)
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                res = model(tok, past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, res.logits[:, -1:].argmax(-1)
            sync()
            dt = (time.perf_counter() - t) / steps
            out[f"decode_b{b}_ms"] = dt * 1e3
            out[f"decode_b{b}_tok_s"] = b / dt
            del past, res
            if device == "cuda":
                torch.cuda.empty_cache()
        if device == "cuda":
            out["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny config on CPU (smoke run)")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the combined results as JSON here")
    args = parser.parse_args()
    args.prompt = args.prompt or (64 if args.small else 2048)
    args.steps = args.steps or (4 if args.small else 32)
    if args.small:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.only:
        result = run_jax(args) if args.only == "jax" else run_torch(args)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for fw in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", fw, "--prompt", str(args.prompt),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
        if args.small:
            cmd.append("--small")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{fw} run failed (exit {proc.returncode})")
        results[fw] = json.loads(lines[-1][len("RESULT "):])
    j, t = results["jax"], results["torch"]
    print(f"device: {j['device']}  (jax {j['jax']}, torch {t['torch']}, transformers {t['transformers']})")
    print(f"weights: {j['param_bytes'] / 1e9:.2f} GB bf16; copy bandwidth {j['copy_bw_GBs']:.0f} GB/s")
    print(f"prefill {args.prompt} tok, batch 1: jax {j['prefill_s'] * 1e3:.1f} ms ({j['prefill_tok_s']:.0f} tok/s), "
          f"torch {t['prefill_s'] * 1e3:.1f} ms  -> jax/torch speed {t['prefill_s'] / j['prefill_s']:.2f}x")
    for b in args.batches:
        floor_ms = (j["param_bytes"] + j[f"kv_b{b}_bytes"]) / (j["copy_bw_GBs"] * 1e9) * 1e3
        print(f"decode batch {b}: jax {j[f'decode_b{b}_ms']:.2f} ms/step ({j[f'decode_b{b}_tok_s']:.1f} tok/s), "
              f"torch {t[f'decode_b{b}_ms']:.2f} ms/step -> {t[f'decode_b{b}_ms'] / j[f'decode_b{b}_ms']:.2f}x; "
              f"bandwidth floor {floor_ms:.2f} ms ({floor_ms / j[f'decode_b{b}_ms'] * 100:.0f}% of floor reached)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()
