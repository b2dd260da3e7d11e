"""``benchmarks/gpu/bench.py`` end to end at ``--small`` size (tiny model, CPU), so the GPU benchmark never rots.

The full-size run needs a GPU; this runs every code path of both sides (JAX and the PyTorch reference),
the report and the option checks, on the tiny config, in a subprocess as ``run.sh`` does.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "bench.py")
BATCHES = (1, 8, 32)
PHASES = ("setup", "ttft", "vision", "prefill", *(f"decode_b{b}" for b in BATCHES))


def _run(*argv: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # no simulated devices from conftest
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    proc = _run("--small", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "bench.json", encoding="utf-8") as f:
        data = json.load(f)
    return proc.stdout, data, (out / "bench.md").read_text(encoding="utf-8")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("side", ["jax", "torch"])
def test_every_measurement_is_there(small_run, side):
    _, data, _ = small_run
    d = data[side]
    assert not d["errors"] and not d["skipped"] and "fatal" not in d, d
    assert set(PHASES) <= set(d["phase_s"]), d["phase_s"]
    for key in ("copy_bw_GBs", "init_s", "peak_mem_bytes"):
        assert _positive(d[key]), (key, d.get(key))
    ttft = d["ttft"]
    assert ttft["pieces"] == 5 and ttft["prompt_tokens"] == 360           # an 896² image: overview + 2×2
    assert ttft["padded_tokens"] == (512 if side == "jax" else 360)
    for key in ("median_s", "preprocess_ms", "vision_ms", "prefill_first_ms"):
        assert _positive(ttft[key]), key
    assert _positive(d["vision"]["pieces_s"]) and d["vision"]["pieces"] == 5
    assert _positive(d["prefill"]["tok_s"]) and d["prefill"]["tokens"] == 256
    for b in BATCHES:
        dec = d[f"decode_b{b}"]
        assert dec["new_tokens"] == 16 and _positive(dec["tn"]["median_s"]) and _positive(dec["t1"]["median_s"])
        assert math.isfinite(dec["step_ms"])     # a difference of two timings: noise may flip tiny CPU ones
    if side == "jax":
        assert d["vision"]["batch"] == 8
        assert _positive(d["read_bw_GBs"]) and _positive(d["split_ms"]) and _positive(d["kv_bytes_per_token"])
        assert set(d["bytes"]) == {"llm", "embed", "vision", "resampler"}
        served = d["serve_b8"]                      # the engine: 8 slots, all busy for most steps
        assert served["slots"] == 8 and served["busy_steps"] >= 8 and _positive(served["step_tok_s"])
        assert _positive(served["vs_vllm_452"]) and _positive(served["tok_s"])
        video = d["video_ttft"]                     # 8 frames of 448×252, the video recipe's 2 slices at most
        assert video["frames"] == 8 and video["pieces"] % 8 == 0 and _positive(video["median_s"])
        assert video["padded_tokens"] >= video["prompt_tokens"] > video["pieces"] * 64
        assert set(d["long_prefill"]) == {f"{a}_T{t}" for a in ("xla", "auto") for t in (256, 1024)}
        quantized = d["quantized"]                  # issue 18: int8 / int4 copies of the model, batch 1 and 8
        assert set(quantized) == {"bfloat16", "int8", "int4"}
        assert quantized["int4"]["llm_bytes"] < quantized["int8"]["llm_bytes"] < quantized["bfloat16"]["llm_bytes"]
        for entry in quantized.values():
            assert {"b1", "b8"} <= set(entry) and all(_positive(entry[b]["tn"]["median_s"]) for b in ("b1", "b8"))
        for r in d["long_prefill"].values():
            assert _positive(r["tok_s"]), r
    else:
        assert d["cache"] == "DynamicCache"


def test_report(small_run):
    stdout, data, md = small_run
    der = data["derived"]
    for b in BATCHES:
        row = der["decode"][str(b)]
        assert _positive(row["floor_ms"]) and row["floor_bytes"] > 0
        assert row["jax_step_ms"] is not None and row["torch_step_ms"] is not None
    assert {"b1_floor_fraction", "b1_speedup", "b1_floor_met", "b1_speedup_met"} <= set(der["goals"])
    assert _positive(der["quantized"]["int8_b1"]["floor_ms"]) and "int8_b1_vs_bf16" in der["quantized_goals"]
    assert data["meta"]["commit"] and data["meta"]["date"] and data["plan"]["small"] is True
    for text in (stdout, md):
        assert "| measurement | JAX | PyTorch |" in text
        for row in ("time to first token, 896² image", "vision encoder", "prefill 256 tokens",
                    *(f"decode batch {b} " for b in BATCHES), "peak memory", "Goals, batch-1 decode",
                    "time to first token, 8-frame video", "prefill 1024 tokens, attention 'auto'",
                    "serving engine, 8 slots busy", "decode batch 1, int8 weights", "decode batch 8, int4 weights"):
            assert row in text, row
    assert "commit `" in md and "Card:" in md


def test_options_are_checked():
    assert "--budget" in _run("--help", timeout=60).stdout
    bad = _run("--small", "--new-tokens", "1", timeout=60)
    assert bad.returncode == 2 and "--new-tokens must be at least 2" in bad.stderr
    bad = _run("--small", "--batches", "0", timeout=60)
    assert bad.returncode == 2 and "--batches" in bad.stderr


def test_dry_run_traces_every_program():
    """``--dry-run`` (full size on a GPU-less machine) on the tiny config: every program traces, memory printed."""
    out = _run("--dry-run", "--small", timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for line in ("5 pieces → encoder batch 8", "traced vision encoder", "traced prefill T=256",
                 *(f"traced generate B={b} " for b in BATCHES), "estimated peak device memory", "fits"):
        assert line in out.stdout, line
