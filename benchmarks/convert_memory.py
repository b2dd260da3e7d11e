"""Peak memory and throughput of ``minicpmv-jax convert`` on synthetic multi-GB checkpoints.

For each LLM depth given (``--layers``), writes an HF-layout bfloat16 checkpoint with the released model's
real tensor names and shapes (full-size embeddings and LM head of 1.09 GB each, 135 MB MLP matrices, the
whole SigLIP tower) but only that many Qwen2 layers: 4 layers make 4.9 GB, 12 make 8.6 GB. Then, in the
same run and on the same disk:

  * copies the safetensors files (read + write + fsync, as the converter's Orbax writer fsyncs too):
    the plain file-copy throughput of the same bytes;
  * runs ``python -m minicpmv_jax.cli convert SRC DST`` in a child process and reads its peak RSS from
    ``wait4`` (the figure ``/usr/bin/time -v`` prints), and its throughput (source bytes / seconds);
  * runs ``--write-only`` in a child: the converter's Orbax partial saves of the same parameters (same
    shapes, dtypes and groups) from memory already filled, with no reading or transposing — the floor of
    the conversion's write side, and where its time goes (the manifest also records the converter's own
    fill and wait-for-writes seconds);
  * alternates them (copy, convert, write-only, copy, ..., ``--repeats`` conversions) and reports medians:
    this machine's disk throughput varies by 3× from one minute to the next;
  * starts every timed step ``--settle`` seconds (default 15) after the previous one deleted its output.
    On virtual machines with free-page reporting (virtio-balloon; these Firecracker VMs) memory freed a
    few seconds earlier is still backed by the host and makes whatever runs next up to 3× faster. Without
    the pause every copy but the first directly follows the deletion of a 5 GB converted folder and gets
    that advantage, while a conversion starts after its child's imports, by when it is gone;
  * runs a child that only imports the converter, for the interpreter + libraries share of that peak.

Goals (issue 5): peak RSS ≤ largest tensor + 1 GB whatever the total size; throughput within 2× of the
copy. Everything is written under a temporary folder (``--workdir``) that is removed at the end.

    python benchmarks/convert_memory.py [--layers 4 12] [--settle 15] [--workdir /tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from minicpmv_jax.config import minicpmv_2_6
from minicpmv_jax.testing.checkpoint import checkpoint_shapes, preprocessor_config

GiB = 1 << 30
SHARD_BYTES = 2 * GiB
PATTERN_BYTES = 32 << 20


def synthetic_config(layers: int):
    cfg = minicpmv_2_6()
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_hidden_layers=layers))


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]], pattern: np.ndarray) -> int:
    """Writes bfloat16 tensors (data: the repeated ``pattern``) one by one; memory stays at the pattern."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = memoryview(pattern.view(np.uint8))
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k, (name, shape) in enumerate(tensors):
            left, start = int(np.prod(shape)) * 2, (k * 4096) % (len(data) // 2)
            while left:
                chunk = data[start:start + left]
                f.write(chunk)
                left -= len(chunk)
                start = 0
    return offset


def write_checkpoint(folder: str, layers: int) -> dict:
    """An HF folder in ~2 GiB shards + index, config and preprocessor config. Returns sizes."""
    cfg = synthetic_config(layers)
    shapes = checkpoint_shapes(cfg)
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal(PATTERN_BYTES // 2, np.float32).astype(ml_dtypes.bfloat16)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for k, group in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(folder, file), group, pattern)
        weight_map.update({name: file for name, _ in group})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**cfg.to_hf_config(), "torch_dtype": "bfloat16"}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(cfg), f)
    largest = max(int(np.prod(s)) * 2 for s in shapes.values())
    return {"tensors": len(shapes), "files": len(shards), "bytes": total, "largest_tensor": largest}


def copy_files(src: str, dst: str) -> float:
    """Seconds to copy every safetensors file of ``src`` to ``dst`` and fsync it (``dst`` removed after)."""
    os.makedirs(dst)
    t = time.perf_counter()
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            fd = os.open(os.path.join(dst, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - t
    shutil.rmtree(dst)
    return seconds


def write_only(src: str, dst: str) -> float:
    """Seconds for the converter's partial saves of ``src``'s parameters from memory already filled.

    Every parameter is a view of one buffer of the largest parameter's size (filled once, before timing),
    saved in the converter's context, one save at a time as the converter does, in groups closed by the
    converter's byte budget (``_convert.GROUP_BYTES``; the converter also closes a group early when its
    ring of host memory is full, which this leaves out: no ring is filled here).
    """
    from minicpmv_jax.convert_weights import _convert
    from minicpmv_jax.convert_weights._ring import Ring
    from minicpmv_jax.convert_weights._source import RowReader
    from minicpmv_jax import checkpoint_names as names
    from minicpmv_jax import orbax_checkpoint as ock
    from minicpmv_jax.config import MiniCPMVConfig
    from minicpmv_jax.hf_checkpoint import HFCheckpoint

    config = MiniCPMVConfig.from_pretrained(src)
    with RowReader(HFCheckpoint.open(src)) as reader:
        jobs = _convert.plan(names.entries(config), reader, None)
    largest = max(j.nbytes for j in jobs)
    buffer = Ring(largest).array((largest,), np.uint8)
    buffer[...] = 7
    groups, group, size = [], {}, 0
    for j in jobs:
        if group and size + j.nbytes > _convert.GROUP_BYTES:
            groups.append(group)
            group, size = {}, 0
        group[ock.tree_key(j.entry.path)] = buffer[:j.nbytes].view(j.dtype).reshape(j.entry.shape)
        size += j.nbytes
    groups.append(group)
    path = os.path.join(dst, "params")
    t = time.perf_counter()
    with ock.save_context():
        for group in groups:
            _convert._write_group(path, ock.nest(group)).result()
        ock.orbax_v1().partial.finalize(path)
    return time.perf_counter() - t


def run_child(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a child process; the peak from wait4, as /usr/bin/time -v."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{argv} failed ({proc.returncode}):\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss * 1024, out.read()


def measure(workdir: str, layers: int, baseline_rss: int, repeats: int, settle: float) -> dict:
    root = tempfile.mkdtemp(prefix=f"convert_bench_{layers}L_", dir=workdir)
    try:
        src = os.path.join(root, "hf")
        os.makedirs(src)
        t = time.perf_counter()
        info = write_checkpoint(src, layers)
        os.sync()                                       # no write-back of the source during the timings
        info["write_s"] = time.perf_counter() - t
        time.sleep(settle)
        copies = [copy_files(src, os.path.join(root, "copy"))]
        converts, walls, peaks, fills, waits, writes = [], [], [], [], [], []
        for _ in range(repeats):                        # copy, convert, write-only, copy, ..., copy
            dst = os.path.join(root, "converted")
            time.sleep(settle)
            wall, peak, out = run_child([sys.executable, "-m", "minicpmv_jax.cli", "convert", src, dst])
            with open(os.path.join(dst, "convert_manifest.json")) as f:
                manifest = json.load(f)
            shutil.rmtree(dst)
            converts.append(float(out.rsplit(" in ", 1)[1].split(" s")[0]))
            walls.append(wall)
            peaks.append(peak)
            fills.append(manifest["timing"]["fill_s"])
            waits.append(manifest["timing"]["wait_for_writes_s"])
            os.makedirs(dst)
            time.sleep(settle)
            _, _, out = run_child([sys.executable, __file__, "--write-only", src, dst])
            writes.append(float(out.split()[-1]))
            shutil.rmtree(dst)
            time.sleep(settle)
            copies.append(copy_files(src, os.path.join(root, "copy")))
        copy_s, convert_s, wall, peak, write_s = (float(np.median(x)) for x in (copies, converts, walls, peaks,
                                                                                  writes))
        n = info["bytes"]
        return {
            "layers": layers, **info, "params_written": manifest["params"]["bytes"],
            "arrays": manifest["params"]["arrays"],
            "copy_s": copy_s, "copy_runs_s": copies, "copy_MBps": n / copy_s / 1e6,
            "convert_s": convert_s, "convert_runs_s": converts, "convert_MBps": n / convert_s / 1e6,
            "process_s": wall, "peak_rss_runs": peaks,
            "fill_runs_s": fills, "wait_for_writes_runs_s": waits,
            "write_only_s": write_s, "write_only_runs_s": writes, "write_only_MBps": n / write_s / 1e6,
            "process_MBps": n / wall / 1e6,
            "peak_rss": max(peaks), "baseline_rss": baseline_rss,
            "peak_minus_largest": max(peaks) - info["largest_tensor"],
            "rss_goal_met": max(peaks) <= info["largest_tensor"] + GiB,
            "speed_goal_met": convert_s <= 2 * copy_s, "settle_s": settle,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _list(xs) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12],
                        help="Qwen2 layers of each synthetic checkpoint (4 → 4.9 GB, 12 → 8.6 GB)")
    parser.add_argument("--repeats", type=int, default=2, help="conversions per size, each between two copies")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds between a step deleting its output and the next timed step")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--write-only", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.write_only:
        print(f"write-only seconds {write_only(*args.write_only)}")
        return
    _, baseline, _ = run_child([sys.executable, "-c", "import minicpmv_jax.convert_weights, minicpmv_jax.cli; "
                                         "from minicpmv_jax.orbax_checkpoint import orbax_v1; orbax_v1()"])
    rows = []
    for layers in args.layers:
        r = measure(args.workdir, layers, baseline, args.repeats, args.settle)
        rows.append(r)
        print(f"{layers:2d} layers: {r['bytes'] / 1e9:5.2f} GB in {r['files']} files, {r['tensors']} tensors, "
              f"largest {r['largest_tensor'] / 1e9:.3f} GB | peak RSS {r['peak_rss'] / 1e9:.3f} GB "
              f"(= largest + {r['peak_minus_largest'] / 1e9:.3f} GB; imports alone {baseline / 1e9:.3f} GB) "
              f"{'OK' if r['rss_goal_met'] else 'OVER'} | convert {r['convert_MBps']:.0f} MB/s "
              f"(median of {_list(r['convert_runs_s'])} s; whole process {r['process_MBps']:.0f} MB/s), file copy "
              f"{r['copy_MBps']:.0f} MB/s (median of {_list(r['copy_runs_s'])} s): "
              f"{r['convert_s'] / r['copy_s']:.2f}× the copy time "
              f"{'OK' if r['speed_goal_met'] else 'SLOW'} | the converter filled for {_list(r['fill_runs_s'])} s "
              f"and waited for writes {_list(r['wait_for_writes_runs_s'])} s; its Orbax saves alone from memory: "
              f"{r['write_only_MBps']:.0f} MB/s (median of {_list(r['write_only_runs_s'])} s), "
              f"{r['write_only_s'] / r['copy_s']:.2f}× the copy time", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
