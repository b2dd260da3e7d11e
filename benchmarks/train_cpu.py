"""A fine-tuning train step on CPU: JAX (full fine-tuning and LoRA) vs a plain PyTorch training step, same
model, same weights, same batch, same cores.

The model is a few-layer Qwen2 (default: 4 layers, width 512, 8 query / 2 KV heads of 64, MLP 1408,
vocabulary 8192, untied embeddings — 19.7 M parameters), float32, written once as an HF-layout MiniCPM-V
checkpoint (a minimal vision tower that text batches never run). The batch is B=4 rows of L=256 random
tokens, every token after the first a target. One train step = forward, backward over the masked
next-token loss, global-norm clipping (1.0) and an AdamW update:

* ``jax-full`` / ``jax-lora``: ``minicpmv_jax.finetune.Trainer`` (the project's compiled step), float32
  computation, no rematerialisation (torch keeps every activation too), LoRA rank 8 on q/k/v/o.
* ``torch-full`` / ``torch-lora``: transformers' ``Qwen2ForCausalLM`` (sdpa attention) + ``torch.optim.AdamW``
  + ``clip_grad_norm_``, eager; LoRA: the hand-written adapters of ``tests/torch_train_reference.py`` (the
  base frozen), the same rank and scale.

Each variant runs in its own process pinned to the same ``--threads`` cores (default 2;
``torch.set_num_threads`` too), so that memory can be measured per variant: *peak memory* is the process's
resident high-water mark (``VmHWM``, reset just before the timed steps) during ``--repeats`` steady steps,
minus the resident size of the runtime measured before the model is built (the framework imported; for JAX
the CPU backend started and one program compiled): weights, optimizer state, activations, gradients,
allocator caches, and whatever else loading the model and compiling the step keeps resident (for JAX a
fixed ≈ 0.15 GiB: see ``--small``). The same up to the end of the first step (loading and XLA's compilation
included) is reported too.
The first step (JAX: trace + compile; torch: first run) is reported separately; steady steps are timed
one by one (JAX blocks on the loss); every variant runs ``--rounds`` times, the order of the variants
reversed every other round so that changing load from other processes hits them alike; the median over all
steady steps of all rounds is reported (memory and first step: median over rounds); tokens/s = B·L /
median. The first step's loss of every variant is checked against ``torch-full``'s (relative ≤ 1e-4; LoRA
starts with B = 0, so the same model), so a broken step cannot be timed silently.

JAX's loss is chunked as ``TrainConfig.loss_chunk`` says (default 512 positions: the default 256-token
rows are not chunked); ``--loss-chunk N`` / ``none`` sets it. ``--variants`` runs a subset (the losses are
then checked against the first one's when ``torch-full`` is left out).

    python benchmarks/train_cpu.py [--layers N] [--width D] [--vocab V] [--seq L] [--batch B] [--threads T]
                                   [--repeats R] [--rounds N] [--loss-chunk N|none] [--variants V,...]
                                   [--small] [--out result.json]

``--small`` is a smoke run (~25 s on 2 cores; ``tests/test_train_cpu_small.py`` runs it so that the
benchmark keeps working): a 2-layer width-128 model on 2×32 tokens, one round of 2 steady steps, and each
JAX variant runs at the same time as its torch counterpart, each on a core of its own with 1 thread, so
the timings only show that both sides ran.
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

from common import reset_peak, status_kib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "tests")):  # the package and the torch references (tests/)
    if _p not in sys.path:
        sys.path.insert(0, _p)

VARIANTS = ("jax-full", "torch-full", "jax-lora", "torch-lora")
LORA_RANK, LORA_ALPHA = 8, 16.0
LR, CLIP = 1e-4, 1.0
LOSS_TOL = 1e-4


def _config(args):
    from minicpmv_jax import config as C

    llm = C.Qwen2Config(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, rope_theta=1e6, rms_norm_eps=1e-6)
    tiny = C.tiny(vision_layers=1, drop_vision_last_layer=False)
    return C.MiniCPMVConfig(llm=llm, vision=tiny.vision, slicing=tiny.slicing, drop_vision_last_layer=False,
                            resampler=C.ResamplerConfig(num_queries=64, embed_dim=args.width,
                                                        kv_dim=tiny.vision.hidden_size))


def _batch(args) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    loss_mask = np.ones_like(ids, bool)
    loss_mask[:, 0] = False
    return {"input_ids": ids, "attention_mask": np.ones_like(ids, bool), "loss_mask": loss_mask}


# --------------------------------------------------------------------------- memory


# --------------------------------------------------------------------------- the steps


def _jax_step(folder: str, batch: dict, lora: bool, loss_chunk: int | None):
    import jax

    from minicpmv_jax import MiniCPMV
    from minicpmv_jax.finetune import LoRAConfig, TrainConfig, Trainer

    config = TrainConfig(learning_rate=LR, total_steps=1000, max_grad_norm=CLIP, compute_dtype="float32",
                         remat=False, train_resampler=False, loss_chunk=loss_chunk,
                         lora=LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA) if lora else None)
    trainer = Trainer(MiniCPMV.from_pretrained(folder, dtype="float32"), config)
    device_batch = trainer.put_batch([batch])
    holder = {"state": trainer.init_state()}

    def step() -> float:
        holder["state"], metrics = trainer.train_step(holder["state"], device_batch)
        return float(jax.block_until_ready(metrics["loss"]))

    return step


def _torch_step(folder: str, batch: dict, lora: bool, threads: int):
    import torch
    from safetensors.numpy import load_file

    from minicpmv_jax.config import MiniCPMVConfig
    from reference import hf_qwen2
    from torch_train_reference import LORA_PROJECTIONS, TorchLoRALinear

    torch.set_num_threads(threads)
    cfg = MiniCPMVConfig.from_pretrained(folder)
    model = hf_qwen2(cfg, load_file(os.path.join(folder, "model.safetensors"))).train()
    if lora:
        model.requires_grad_(False)
        rng = np.random.default_rng(0)
        for layer in model.model.layers:
            for name in LORA_PROJECTIONS:
                base = getattr(layer.self_attn, name)
                a = rng.uniform(-1, 1, (base.in_features, LORA_RANK)) / np.sqrt(base.in_features)
                setattr(layer.self_attn, name, TorchLoRALinear(base, a, np.zeros((LORA_RANK, base.out_features)),
                                                               LORA_ALPHA / LORA_RANK))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, eps=1e-8)
    ids = torch.from_numpy(batch["input_ids"]).long()
    mask = torch.from_numpy(batch["attention_mask"]).long()
    targets = torch.from_numpy(batch["loss_mask"][:, 1:])

    def step() -> float:
        logits = model(input_ids=ids, attention_mask=mask).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="none")
        loss = (losses.reshape(targets.shape) * targets).sum() / targets.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _worker(args) -> None:
    """One variant in this process; prints its result as JSON on the last line."""
    framework, kind = args.worker.split("-")
    batch = _batch(args)
    if framework == "jax":  # the runtime, before any model exists: the CPU backend started, one program compiled
        import jax

        import minicpmv_jax.finetune.train_step  # noqa: F401
        jax.block_until_ready(jax.jit(lambda x: x + 1)(np.zeros(4, np.float32)))
    else:
        import torch_train_reference  # noqa: F401 (torch, transformers)
    runtime = status_kib("VmRSS")
    if framework == "jax":
        chunk = None if args.loss_chunk == "none" else int(args.loss_chunk)
        step = _jax_step(args.folder, batch, kind == "lora", chunk)
    else:
        step = _torch_step(args.folder, batch, kind == "lora", args.threads)
    t0 = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - t0
    first_peak = status_kib("VmHWM")
    reset_peak()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = status_kib("VmHWM")
    print(json.dumps({"variant": args.worker, "first_step_s": first, "times_s": times, "first_loss": first_loss,
                      "runtime_mib": runtime / 1024, "steady_mib": (peak - runtime) / 1024,
                      "first_mib": (first_peak - runtime) / 1024}))


# --------------------------------------------------------------------------- the driver


def _start_variant(variant: str, folder: str, args, cores: list[int]) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--folder", folder]
    for name in ("layers", "width", "heads", "kv_heads", "mlp", "vocab", "seq", "batch", "repeats", "threads",
                 "loss_chunk"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(args.threads))
    env.pop("XLA_FLAGS", None)                       # one CPU device, no simulated mesh
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


def _finish_variant(variant: str, process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"{variant} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _run_variants(variants: list[str], folder: str, args, cores: list[int]) -> dict:
    """Each variant in its own process on ``cores``; with ``args.parallel``, a JAX variant and its torch
    counterpart at the same time, on disjoint cores (``args.threads`` each)."""
    if not args.parallel:
        return {v: _finish_variant(v, _start_variant(v, folder, args, cores)) for v in variants}
    results, pending = {}, list(variants)
    while pending:
        first = pending.pop(0)
        pair = [first] + [v for v in pending if v.split("-")[1] == first.split("-")[1]][:1]
        pending = [v for v in pending if v not in pair]
        running = [(v, _start_variant(v, folder, args, cores[i * args.threads:(i + 1) * args.threads]))
                   for i, v in enumerate(pair)]
        results.update((v, _finish_variant(v, p)) for v, p in running)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=4, help="steady steps per variant and round")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant, in alternating order")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss-chunk", default="default",
                   help="TrainConfig.loss_chunk of the JAX variants: positions per loss chunk, or 'none' "
                        "(default: the TrainConfig default)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--small", action="store_true",
                   help="smoke run (~25 s): a 2-layer width-128 model on 2×32 tokens, JAX and torch variants in "
                        "parallel on one core each")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or len(set(variants)) != len(variants):
        raise SystemExit(f"--variants: expected distinct names among {VARIANTS}, got {args.variants!r}")
    if args.loss_chunk not in ("default", "none") and not (args.loss_chunk.isdigit() and int(args.loss_chunk) > 0):
        raise SystemExit(f"--loss-chunk: expected a positive integer, 'none' or 'default', got {args.loss_chunk!r}")
    if args.loss_chunk == "default":
        from minicpmv_jax.finetune.config import DEFAULT_LOSS_CHUNK
        args.loss_chunk = str(DEFAULT_LOSS_CHUNK)
    cores = sorted(os.sched_getaffinity(0))
    args.parallel = False
    if args.small:
        args.layers, args.width, args.heads, args.kv_heads, args.mlp, args.vocab = 2, 128, 4, 2, 256, 512
        args.seq, args.batch, args.repeats, args.rounds = 32, 2, 2, 1
        args.parallel = len(cores) >= 2
        if args.parallel:
            args.threads = 1
    if not 1 <= args.threads <= len(cores):
        raise SystemExit(f"--threads must be between 1 and {len(cores)}, got {args.threads}")
    cores = cores[:2 * args.threads] if args.parallel else cores[:args.threads]

    from minicpmv_jax.testing.checkpoint import write_checkpoint

    cfg = _config(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="train_cpu_") as folder:
        tensors = write_checkpoint(folder, cfg, seed=0, num_shards=1, tokenizer=False)
        llm_params = sum(t.size for name, t in tensors.items() if name.startswith("llm."))
        for round_ in range(args.rounds):            # alternate the order: load drift hits every variant alike
            for variant, r in _run_variants(variants if round_ % 2 == 0 else variants[::-1], folder, args,
                                            cores).items():
                if variant not in results:
                    results[variant] = {**r, "times_s": [], "first_step_s": [], "steady_mib": [], "first_mib": []}
                for key in ("times_s", "first_step_s", "steady_mib", "first_mib"):
                    results[variant][key] += r[key] if key == "times_s" else [r[key]]
        results = {v: results[v] for v in variants}
        for r in results.values():
            for key in ("first_step_s", "steady_mib", "first_mib"):
                r[key] = statistics.median(r[key])
    _report(args, cfg, llm_params, results)


def _report(args, cfg, llm_params: int, results: dict) -> None:
    import jax
    import torch
    import transformers

    tokens = args.batch * args.seq
    reference_variant = "torch-full" if "torch-full" in results else next(iter(results))
    reference = results[reference_variant]["first_loss"]
    for variant, r in results.items():
        r["median_s"] = statistics.median(r["times_s"])
        r["tokens_per_s"] = tokens / r["median_s"]
        r["loss_rel_diff"] = abs(r["first_loss"] - reference) / abs(reference)
    llm = cfg.llm
    print(f"model: Qwen2 {llm.num_hidden_layers} layers, width {llm.hidden_size}, {llm.num_attention_heads}/"
          f"{llm.num_key_value_heads} heads of {llm.head_dim}, MLP {llm.intermediate_size}, vocab "
          f"{llm.vocab_size}: {llm_params / 1e6:.1f} M parameters; batch {args.batch}×{args.seq} = {tokens} "
          f"tokens; float32; LoRA rank {LORA_RANK} on q/k/v/o")
    together = ", JAX and torch variants two at a time on disjoint cores" if args.parallel else ""
    print(f"threads: {args.threads} per variant (each in its own process{together}); jax {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; JAX loss_chunk {args.loss_chunk}; load "
          f"average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<11} {'first step s':>12} {'median s':>9} {'min s':>7} {'tokens/s':>9} "
          f"{'peak MiB':>9} {'1st-step MiB':>12} {'runtime MiB':>11} {'loss rel diff':>13}")
    for variant, r in results.items():
        print(f"{variant:<11} {r['first_step_s']:>12.2f} {r['median_s']:>9.3f} {min(r['times_s']):>7.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['steady_mib']:>9.0f} {r['first_mib']:>12.0f} {r['runtime_mib']:>11.0f} "
              f"{r['loss_rel_diff']:>13.1e}")
    for kind in ("full", "lora"):
        if f"jax-{kind}" not in results or f"torch-{kind}" not in results:
            continue
        jr, tr = results[f"jax-{kind}"], results[f"torch-{kind}"]
        print(f"{kind}: JAX/torch tokens/s {jr['tokens_per_s'] / tr['tokens_per_s']:.2f}x, "
              f"peak memory {jr['steady_mib'] / tr['steady_mib']:.2f}x")
    print("(peak MiB: resident high-water mark during the steady steps minus the resident size of the imported "
          "runtime, i.e. weights + optimizer state + the step's buffers; 1st-step MiB: the same up to the end of "
          "the first step, loading and JAX's compilation included)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "llm_params": llm_params, "results": results}, f, indent=2)
    bad = {v: r["loss_rel_diff"] for v, r in results.items() if r["loss_rel_diff"] > LOSS_TOL}
    if bad:
        raise SystemExit(f"first-step losses differ from {reference_variant}'s by more than {LOSS_TOL}: {bad}")


if __name__ == "__main__":
    main()
