"""``benchmarks/train_cpu.py --small`` still runs: every variant (JAX and torch, full and LoRA) trains, the
printed table and comparison are complete, and the first-step losses agree (the script itself fails
beyond 1e-4; checked here from its JSON output too). About 25 s on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("jax-full", "torch-full", "jax-lora", "torch-lora")


def test_train_cpu_small_compares_jax_and_torch(tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # no simulated devices from conftest
    env["JAX_PLATFORMS"] = "cpu"
    script = os.path.join(ROOT, "benchmarks", "train_cpu.py")
    run = subprocess.run([sys.executable, script, "--small", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout
    number, mib = r"\s+([\d.]+)", r"\s+(-?\d+)"
    for variant in VARIANTS:     # variant, first step s, median s, min s, tokens/s, 3 × MiB, loss rel diff
        row = re.search(rf"^{variant}{number * 3}\s+(\d+){mib * 3}\s+([\d.e+-]+)$", text, re.M)
        assert row, (variant, text)
        assert int(row.group(4)) > 0 and float(row.group(8)) <= 1e-4, row.group(0)
    for kind in ("full", "lora"):
        assert re.search(rf"^{kind}: JAX/torch tokens/s \d+\.\d+x, peak memory -?\d+\.\d+x$", text, re.M), text
    results = json.loads(out.read_text())["results"]
    assert list(results) == list(VARIANTS)
    reference = results["torch-full"]["first_loss"]
    for variant, r in results.items():
        assert r["tokens_per_s"] > 0 and len(r["times_s"]) == 2, variant
        assert abs(r["first_loss"] - reference) <= 1e-4 * abs(reference), (variant, r["first_loss"], reference)


def test_train_cpu_refuses_bad_options():
    script = os.path.join(ROOT, "benchmarks", "train_cpu.py")
    for argv, message in ((["--variants", "jax-full,torch-fast"], "--variants: expected distinct names"),
                          (["--loss-chunk", "0"], "--loss-chunk: expected a positive integer")):
        run = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and message in run.stderr, (argv, run.stderr[-2000:])
