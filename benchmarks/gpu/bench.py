"""MiniCPM-V 2.6 at full size on one GPU: JAX (this project) vs the PyTorch reference, same run, same card.

Both sides hold random bfloat16 weights of the released shapes (``minicpmv_2_6()``: SigLIP with the 26
layers that run, resampler, Qwen2-7B; 16.2 GB) and run, each in its own subprocess (JAX's allocator and
torch's caching allocator do not share a card well; PyTorch first, then JAX), these phases in this order:

  setup      a device copy of a 4 GiB bf16 buffer: copy bandwidth = read + write bytes / time (JAX also
             times a read-only float32 sum of it). Then the model. JAX: ``MiniCPMV`` (its own module
             tree, ``nnx.eval_shape``) filled with N(0, 0.02) windows of one random buffer (norms 1 + …),
             see ``bench_jax.random_model`` (the model's eager initialiser compiles for tens of seconds).
             PyTorch: transformers ``Qwen2ForCausalLM`` (``attn_implementation="sdpa"``, eager) plus
             ``TorchSiglip`` / ``TorchResampler`` of ``tests/torch_vision_reference.py``, all built directly
             on the device in bf16 with their own initialisation (``bench_torch.build_torch``).
  ttft       time to first token for a fresh random 1344×1344 image (overview + 3×3 slices = 10 pieces of
             448²; a 691-token prompt in the layout of docs/model.md §6 with random text ids — no tokenizer):
             ``preprocess_image`` (the project's PIL preprocessing, on both sides) → vision → prefill →
             the first token on the host. JAX: ``generate.prepare_batch`` (prompt left-padded to 1024, pieces
             packed into a batch of 16, feature cache, encoder + resampler in one jit) then
             ``generate.generate(max_new_tokens=1)`` — chat's own path (``generate`` also runs the chosen
             token through the model before it returns: one decode step is inside this time). PyTorch:
             per piece ``TorchSiglip`` → ``TorchResampler`` (one piece at a time, as the reference is
             written), the features written into ``embed_tokens(ids)``, then
             ``Qwen2ForCausalLM.generate(inputs_embeds=…, max_new_tokens=1)`` — MiniCPM-V's ``chat()``
             path. Each repetition uses a new image; the stages (preprocess / vision / prefill + first
             token) are timed with a device sync between them.
  vision     vision encoder + resampler alone on the 10 pieces of one image, host pixels → features on the
             device: pieces/s. JAX: ``model.encode_pieces_packed`` on ``pack_for_encoder``'s batch of 16
             (10 real); PyTorch: the per-piece loop.
  decode_bB  decode tokens/s at batch B (1, 8, 32). B = 1 decodes after the image prompt above; B > 1 after
             B random text prompts of 1024 tokens. Greedy, ``min_new_tokens = max_new_tokens`` so no row
             stops early (checked: every row returns the full count). JAX: ``generate.generate`` — prefill
             and the whole decode loop in one compiled call, KV cache of T + 64 slots. PyTorch:
             transformers ``generate`` (greedy, DynamicCache, eager: no torch.compile, no CUDA graphs).
             Both sides time the same call with N = 64 new tokens and with 1: a decode step is
             ``(t(N) − t(1)) / (N − 1)`` (the prefill cancels), tokens/s = B / step.
  prefill    a 2048-token text prompt at batch 1, up to the first logits: JAX ``generate.prefill`` (cache of
             2048 + 16 slots); PyTorch ``Qwen2ForCausalLM(..., logits_to_keep=1)`` with a fresh DynamicCache.
  peak memory  JAX: the device's ``peak_bytes_in_use``; PyTorch: ``torch.cuda.max_memory_allocated`` (reset
             after the copy test). With ``--small`` on CPU: the process's peak RSS instead.

The HBM floor of a decode step at batch B is the bytes a step must read — the language model's weights
without the embedding table (only one row per token is gathered) plus the K/V of the valid context,
averaged over the measured steps — divided by the copy bandwidth JAX measured on the same card. Goals:
batch-1 decode reaches ≥ 85 % of that floor, and is ≥ 3× faster than the PyTorch reference.

Each measurement: one warm-up call (for JAX it includes tracing and XLA compilation; reported per phase as
its first call), then the median of up to ``--repeats`` calls, fewer once ``--max-measure-s`` is spent.
Time budget: the whole run keeps to ``--budget`` seconds. PyTorch runs first and may use ``--torch-share``
of them, JAX the rest; a side starts no phase within ``--grace`` seconds of the end of its share, is killed
at the end of it, and saves its results after every phase — a run cut short reports what it measured and
names what it skipped. Each phase's duration is printed as it ends and summarised in the report.

Output: a table on stdout, and in ``--out`` DIR: ``bench.json`` (everything), ``bench.md`` (a section
ready to paste into ``benchmarks/RESULTS.md``, with card, date and commit) and ``bench_{torch,jax}.json``.
Exit status 1 when a phase failed or a side died.

    python benchmarks/gpu/bench.py [--out DIR] [--budget 300] [--repeats 3]   # full size, one GPU
    python benchmarks/gpu/bench.py --small --out DIR                          # tiny model on CPU, ~30 s
    python benchmarks/gpu/bench.py --dry-run [--small]                        # shapes and memory, no allocation

``--small``: the tiny test config (2 LLM layers, vocabulary 4099), an 896² image (5 pieces), prompts of
128 / 256 tokens, N = 16, on the CPU, both frameworks at once with one thread each — every code path of
the full run in about half a minute (``tests/test_gpu_bench_small.py`` runs it).
``--dry-run`` traces every JAX program of the run with ``jax.eval_shape`` at full size (nothing is
allocated) and prints an estimate of each phase's device memory on both sides against the card's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, Plan, Recorder  # noqa: E402 (after the path; also puts the package on it)
from bench_report import derive, gpu_line, git_commit, render  # noqa: E402


class _Side:
    """One framework's run in its own subprocess, killed after ``share_s`` seconds; it starts no phase after
    ``share_s - grace_s`` and saves its results after every phase."""

    def __init__(self, side: str, plan: Plan, out_dir: str, share_s: float, grace_s: float):
        self.side, self.share_s = side, share_s
        self.path = os.path.join(out_dir, f"bench_{side}.json")
        if os.path.exists(self.path):
            os.remove(self.path)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
        if plan.small:   # tiny model on a shared CPU: one thread each (spinning thread pools fight over cores)
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                " intra_op_parallelism_threads=1").strip()
            env["OMP_NUM_THREADS"] = "1"
        print(f"=== {side}: at most {share_s:.0f} s", flush=True)
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", side, "--plan",
             json.dumps(dataclasses.asdict(plan)), "--result-file", self.path,
             "--deadline-s", f"{max(share_s - grace_s, 1.0):.1f}"], env=env)

    def wait(self) -> tuple[dict, float]:
        """The (possibly partial) results and the wall time."""
        try:
            code = self.proc.wait(timeout=max(self.share_s - (time.monotonic() - self.start), 0.1))
            fatal = None if code == 0 else f"process exited with status {code}"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            fatal = f"killed after {self.share_s:.0f} s (its share of the time budget)"
        wall = time.monotonic() - self.start
        try:
            with open(self.path, encoding="utf-8") as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {}
        if fatal:
            res["fatal"] = fatal
        return res, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny config on CPU (smoke run, seconds)")
    parser.add_argument("--dry-run", action="store_true",
                        help="trace the full-size JAX programs and estimate memory; allocate and time nothing")
    parser.add_argument("--out", default=None, help="folder for bench.json, bench.md and each side's results")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--new-tokens", type=int, default=None, help="N, tokens per timed generate (default 64)")
    parser.add_argument("--decode-prompt", type=int, default=None,
                        help="prompt tokens of the batch > 1 decode runs (default 1024; --small 128)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt (default 2048; --small 256)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the TTFT / vision image (default 1344: 10 pieces; --small 896: 5 pieces)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; --small 2)")
    parser.add_argument("--max-measure-s", type=float, default=10.0,
                        help="stop repeating a measurement after this many seconds")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the whole benchmark")
    parser.add_argument("--torch-share", type=float, default=120.0,
                        help="seconds the PyTorch side may use (it runs first; JAX gets the rest of the budget)")
    parser.add_argument("--grace", type=float, default=None,
                        help="no phase starts later than this many seconds before a side's share ends "
                             "(default 40; --small 10)")
    parser.add_argument("--sides", nargs="+", choices=["jax", "torch"], default=["jax", "torch"])
    parser.add_argument("--device-gb", type=float, default=79.6, help="card memory for --dry-run (H100: 79.6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.plan).items()})
        rec = Recorder(args.result_file, args.child, args.deadline_s)
        rec.save()
        if args.child == "jax":
            from bench_jax import run_jax as run
        else:
            from bench_torch import run_torch as run
        run(plan, rec)
        rec.res["process_s"] = time.monotonic() - rec.start
        rec.save()
        return 0

    small = args.small
    plan = Plan(small=small, batches=tuple(dict.fromkeys(args.batches)),
                new_tokens=args.new_tokens or (16 if small else 64),
                decode_prompt=args.decode_prompt or (128 if small else 1024),
                prefill_tokens=args.prefill_tokens or (256 if small else 2048),
                image_size=args.image_size or (896 if small else 1344), repeats=args.repeats or (2 if small else 3),
                max_measure_s=args.max_measure_s, copy_mib=64 if small else 4096, seed=args.seed,
                long_lengths=(256, 1024) if small else (4096, 16384), video_frames=8 if small else 64,
                video_frame=(448, 252) if small else (896, 504))
    if plan.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (a decode step is (t(N) - t(1)) / (N - 1))")
    if min(plan.batches) < 1 or plan.repeats < 1 or plan.image_size < 14:
        parser.error("--batches and --repeats must be positive, --image-size at least 14")
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from bench_jax import dry_run

        dry_run(plan, args.device_gb)
        return 0

    grace = args.grace if args.grace is not None else (10.0 if small else 40.0)
    out_dir = args.out or tempfile.mkdtemp(prefix="minicpmv-bench-")
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    results, wall = {"jax": {}, "torch": {}}, {}
    sides = [s for s in ("torch", "jax") if s in args.sides]          # JAX last: its compile times vary most
    if small:   # one thread each on the CPU: both at once (timings of the tiny model mean nothing anyway)
        running = [_Side(side, plan, out_dir, args.budget, grace) for side in sides]
        for r in running:
            results[r.side], wall[r.side] = r.wait()
    else:       # one after the other: the card and its memory to one framework at a time
        for side in sides:
            left = args.budget - (time.monotonic() - start)
            share = max(min(left, args.torch_share) if side == "torch" and "jax" in sides else left, 5.0)
            results[side], wall[side] = _Side(side, plan, out_dir, share, grace).wait()
    jx, th = results["jax"], results["torch"]
    meta = {"card": gpu_line() or jx.get("device") or th.get("device") or "?",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "wall_s": wall, "total_s": time.monotonic() - start}
    der = derive(plan, jx, th)
    text, md = render(plan, meta, jx, th, der)
    print()
    print(text)
    print(f"\ntotal {meta['total_s']:.0f} s (budget {args.budget:.0f} s); results in {out_dir}")
    with open(os.path.join(out_dir, "bench.json"), "w", encoding="utf-8") as f:
        json.dump({"plan": dataclasses.asdict(plan), "meta": meta, "jax": jx, "torch": th, "derived": der}, f,
                  indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w", encoding="utf-8") as f:
        f.write(md)
    failed = any(d.get("errors") or d.get("fatal") for d in (jx, th) if d is not None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

