"""SigLIP encoder + resampler on CPU: JAX vs the torch reference, same process, same weights, same cores.

Two inputs go through the real preprocessing (``preprocess_image``, ``max_slice_nums=9``):

  * a random 448×448 image → one 448×448 piece (32×32 patches);
  * a random 1344×1344 image → overview + 3×3 slices = 10 pieces of 448×448.

The model is the full-size vision tower of ``minicpmv_2_6()`` (SigLIP-so400m: width 1152, MLP 4304,
16 heads, the 26 layers the model runs) and its resampler (64 queries to width 3584), with random float32
weights of a realistic spread (``randomize_`` of the torch reference in ``tests/``). Our modules are
filled from the reference's tensors through the name table, so both frameworks hold the same weights.
JAX runs an image's pieces as one padded batch (``pack_pieces``; one jit for encoder + resampler); the
torch reference runs one piece at a time, as it is written (eager, oneDNN/MKL).

Timing is per image, from the preprocessed pixels to the resampler output ``[pieces, 64, 3584]`` on the
host. The first call (JAX: trace + XLA compile, then the first run; torch: the first run) is reported
separately. Then ``--repeats`` steady-state calls, JAX and torch alternating (the order swapped every
round) so that load from other processes hits both alike; median and min are printed and the ratio uses
the medians. Both frameworks use the same cores: ``--threads T`` pins the process to T cores before
either library starts its thread pool and sets ``torch.set_num_threads(T)``; by default both use every
core the process may run on. The outputs are compared (max |a − b| / max |b| over all pieces) and the
run fails when they differ by more than ``--tol``, so a broken model cannot be timed silently.

    python benchmarks/vision_cpu.py [--layers N] [--repeats R] [--threads T] [--small] [--out result.json]

``--small`` runs the tiny test config on the same images (a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "tests")):  # the package and the torch reference (tests/)
    if _p not in sys.path:
        sys.path.insert(0, _p)

CASES = (("448x448", 448, "1 piece"), ("1344x1344", 1344, "overview + 3x3 slices"))
MAX_SLICE_NUMS = 9


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b| (the metric of the parity tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _config(small: bool, layers: int | None):
    from minicpmv_jax.config import minicpmv_2_6, tiny

    cfg = tiny() if small else minicpmv_2_6()
    if layers is not None:
        if layers < 1:
            raise SystemExit(f"--layers must be at least 1, got {layers}")
        vision = dataclasses.replace(cfg.vision, num_hidden_layers=layers + int(cfg.drop_vision_last_layer))
        cfg = dataclasses.replace(cfg, vision=vision)
    return cfg


def _images(seed: int) -> dict[str, list[np.ndarray]]:
    """Random RGB images through the real preprocessing → {case: list of float32 [3, h, w] pieces}."""
    from PIL import Image

    from minicpmv_jax.image_processing import preprocess_image

    rng = np.random.default_rng(seed)
    out = {}
    for name, side, _ in CASES:
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
        out[name] = preprocess_image(img, max_slice_nums=MAX_SLICE_NUMS).pixel_values
    return out


def _gflop(cfg, grids: list[tuple[int, int]]) -> float:
    """Multiply-adds ×2 of encoder + resampler over the pieces' real patches (padding not counted)."""
    v, r = cfg.vision, cfg.resampler
    d, f, e, q = v.hidden_size, v.intermediate_size, r.embed_dim, r.num_queries
    total = 0
    for h, w in grids:
        p = h * w
        layer = 2 * p * (4 * d * d + 2 * d * f) + 4 * p * p * d
        encoder = 2 * p * v.patch_dim * d + cfg.num_vision_layers * layer
        resampler = 2 * p * d * e + 4 * p * e * e + 6 * q * e * e + 4 * q * p * e
        total += encoder + resampler
    return total / 1e9


def _stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "all_ms": [t * 1e3 for t in times]}


# --------------------------------------------------------------------------------------------- models


def _torch_models(cfg):
    from torch_vision_reference import TorchResampler, TorchSiglip, randomize_

    v, r = cfg.vision, cfg.resampler
    vpm = TorchSiglip(v.hidden_size, v.intermediate_size, v.num_attention_heads, cfg.num_vision_layers,
                      patch_size=v.patch_size, side=v.num_patches_per_side, eps=v.layer_norm_eps)
    resampler = TorchResampler(r.num_queries, r.embed_dim, r.kv_dim, head_dim=r.head_dim, eps=r.layer_norm_eps)
    return randomize_(vpm, seed=0).eval(), randomize_(resampler, seed=1).eval()


def _jax_forward(cfg, vpm, resampler):
    """Our encoder + resampler filled with the reference's tensors → jitted ``f(state, batch)`` and state."""
    import jax
    from flax import nnx

    from minicpmv_jax import checkpoint_names as names
    from minicpmv_jax.resampler import Resampler
    from minicpmv_jax.vision import VisionEncoder
    from torch_vision_reference import numpy_state_dict

    towers = []
    for tower, ref, build in (("vpm", vpm, lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0))),
                              ("resampler", resampler, lambda: Resampler(cfg.resampler, rngs=nnx.Rngs(0)))):
        tensors = {f"{tower}.{k}": v for k, v in numpy_state_dict(ref).items()}
        towers.append(names.load_entries(nnx.eval_shape(build), tensors.__getitem__,
                                         names.entries(cfg, (tower,)), strip=1))
    graphdef, state = nnx.split(tuple(towers))

    @jax.jit
    def forward(state, patches, pos_ids, valid, tgt_sizes):
        encoder, res = nnx.merge(graphdef, state)
        return res(encoder(patches, pos_ids, valid), tgt_sizes)

    return forward, state


# ------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny config (smoke run, seconds)")
    parser.add_argument("--layers", type=int, default=None, help="vision layers to run (default: the model's 26)")
    parser.add_argument("--repeats", type=int, default=None, help="steady-state calls per input (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="cores for both frameworks (default: all this process may use)")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest JAX-vs-torch relative error accepted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.small else 3)

    # Cores first: both thread pools (XLA's and torch's OpenMP) size themselves from the affinity mask.
    cores = sorted(os.sched_getaffinity(0))
    if args.threads is not None:
        if not 1 <= args.threads <= len(cores):
            raise SystemExit(f"--threads must be between 1 and {len(cores)}, got {args.threads}")
        if "jax" in sys.modules or "torch" in sys.modules:
            print("note: jax/torch already imported; XLA keeps the thread pool it started with")
        cores = cores[:args.threads]
        os.sched_setaffinity(0, cores)
    threads = len(cores)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import torch

    from minicpmv_jax.patches import pack_pieces

    torch.set_num_threads(threads)
    cfg = _config(args.small, args.layers)
    v, r = cfg.vision, cfg.resampler

    t = time.perf_counter()
    images = _images(args.seed)
    preprocess_s = time.perf_counter() - t
    t = time.perf_counter()
    vpm, resampler = _torch_models(cfg)
    weights_s = time.perf_counter() - t
    t = time.perf_counter()
    forward, state = _jax_forward(cfg, vpm, resampler)
    jax.block_until_ready(state)
    load_s = time.perf_counter() - t
    side = v.num_patches_per_side

    def run_jax(compiled, pieces):
        patches, pos, valid, tgt = pack_pieces(pieces, side=side, patch_size=v.patch_size)
        return np.asarray(compiled(state, patches, pos, valid, tgt))[:len(pieces)]

    def run_torch(pieces):
        with torch.no_grad():
            outs = [resampler(vpm(torch.from_numpy(px)), px.shape[1] // v.patch_size, px.shape[2] // v.patch_size)
                    for px in pieces]
            return torch.stack(outs).numpy()

    def timed(fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        return out, time.perf_counter() - t

    header = (f"vision {v.hidden_size} wide x {cfg.num_vision_layers} layers, MLP {v.intermediate_size}, "
              f"{v.num_attention_heads} heads; resampler {r.num_queries} queries -> {r.embed_dim}; float32")
    print(header)
    print(f"threads: {threads} for both (cores {cores}; torch.get_num_threads() = {torch.get_num_threads()}); "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")
    print(f"setup: preprocessing {preprocess_s:.2f} s, torch weights {weights_s:.1f} s, "
          f"loading them into JAX {load_s:.1f} s; {repeats} steady-state calls per input", flush=True)

    results = {"config": header, "threads": threads, "cores": cores, "jax": jax.__version__,
               "torch": torch.__version__, "repeats": repeats, "layers": cfg.num_vision_layers,
               "small": args.small, "cases": {}}
    for name, _, what in CASES:
        pieces = images[name]
        grids = [(px.shape[1] // v.patch_size, px.shape[2] // v.patch_size) for px in pieces]
        batch = pack_pieces(pieces, side=side, patch_size=v.patch_size)
        t = time.perf_counter()
        compiled = forward.lower(state, *batch).compile()
        compile_s = time.perf_counter() - t
        ours, jax_first = timed(run_jax, compiled, pieces)
        ref, torch_first = timed(run_torch, pieces)
        err = rel_err(ours, ref)
        jax_t, torch_t = [], []
        for i in range(repeats):
            order = ((run_jax, (compiled, pieces), jax_t), (run_torch, (pieces,), torch_t))
            for fn, a, sink in (order if i % 2 == 0 else order[::-1]):
                sink.append(timed(fn, *a)[1])
        gflop = _gflop(cfg, grids)
        case = {"pieces": len(pieces), "grids": grids, "padded_patches": int(batch[0].shape[1]),
                "gflop": gflop, "rel_err": err, "jax_compile_s": compile_s, "jax_first_s": jax_first,
                "torch_first_s": torch_first, "jax": _stats(jax_t), "torch": _stats(torch_t)}
        case["ratio"] = case["jax"]["median_ms"] / case["torch"]["median_ms"]
        results["cases"][name] = case
        print(f"{name} ({what}): {len(pieces)} piece(s) {sorted(set(grids))}, padded to "
              f"{case['padded_patches']} patches, {gflop:.0f} GFLOP; rel err {err:.2e}; "
              f"JAX compile {compile_s:.1f} s + first run {jax_first:.2f} s, torch first run {torch_first:.2f} s",
              flush=True)
        if not err <= args.tol:
            raise SystemExit(f"{name}: JAX and torch outputs differ (rel err {err:.3e} > tol {args.tol:g}); "
                             "not timing a broken model")

    print()
    print("| input | pieces | JAX ms/image (min) | torch ms/image (min) | JAX/torch time | JAX GFLOP/s "
          "| torch GFLOP/s | rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, case in results["cases"].items():
        j, tr = case["jax"], case["torch"]
        print(f"| {name} | {case['pieces']} | {j['median_ms']:.0f} ({j['min_ms']:.0f}) | "
              f"{tr['median_ms']:.0f} ({tr['min_ms']:.0f}) | {case['ratio']:.2f} | "
              f"{case['gflop'] / j['median_ms'] * 1e3:.0f} | {case['gflop'] / tr['median_ms'] * 1e3:.0f} | "
              f"{case['rel_err']:.1e} |")
    print(f"(JAX/torch time < 1: JAX faster. {threads} thread(s) each, median of {repeats}.)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
