"""``benchmarks/sharding_report.py --small`` end to end: the compiled decode step's collectives and memory on
every mesh of the sharding issue, on the tiny config, in a subprocess with its own 8 simulated devices.

Only what follows from the rules themselves is asserted (XLA's choice of collectives may move between
versions): pure data parallelism communicates nothing; without a tensor axis the attention needs no
collective; tensor = 8 splits the tiny model's head_dim (4 heads, 2 KV heads do not divide 8), so every layer
all-reduces its attention logits; memory per device matches the split; the extrapolation from 1 and 2
layers equals a full-depth compile.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sharding_report.py")
MESHES = [[8, 1, 1], [1, 8, 1], [1, 1, 8], [2, 2, 2], [1, 2, 4]]
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
ATTENTION_LOGITS = "BKGTH,BSKH->BKGTS"   # the q·k einsum of attention.attention (batched schedule)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding_report") / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, SCRIPT, "--small", "--batch", "8", "--no-alternatives", "--check",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out, encoding="utf-8") as f:
        return proc.stdout, json.load(f)


def _rows(data):
    return {tuple(r["mesh"]): r for r in data["rows"]}


def test_every_mesh_is_in_the_table(report):
    stdout, data = report
    assert data["config"] == "tiny" and sorted(_rows(data)) == sorted(map(tuple, MESHES))
    assert "check: (1, 1, 8) B=8: the 3-layer compile" in stdout     # extrapolation == full-depth compile
    for mesh in MESHES:
        assert f"| {','.join(map(str, mesh))} | default | 8 |" in stdout
    for r in data["rows"]:
        assert r["layers"] == 3 and r["compiled_layers"] == [1, 2] and r["batch"] == 8
        for key, value in r["numbers"].items():
            assert math.isfinite(value) and value >= 0, (r["mesh"], key, value)


def _sources(row):
    return [(sig[0], sig[3]) for sig, _ in row["per_layer"] + row["once"]]


def test_collectives_follow_the_rules(report):
    rows = _rows(report[1])
    data_parallel = rows[(8, 1, 1)]["numbers"]
    assert all(data_parallel[f"{kind}.n"] == 0 for kind in KINDS)        # B = 8 rows on 8 replicas: no traffic
    for mesh in [(8, 1, 1), (1, 8, 1)]:                                  # tensor = 1: attention is device-local
        assert not any(ATTENTION_LOGITS in src for _, src in _sources(rows[mesh])), mesh
        assert rows[mesh]["numbers"]["collective-permute.n"] == 0, mesh
    tensor8 = rows[(1, 1, 8)]
    per_layer = [(sig[0], sig[3], n) for sig, n in tensor8["per_layer"]]
    assert ("all-reduce", ATTENTION_LOGITS, 1) in [(k, s.split("/")[0], n) for k, s, n in per_layer]
    for mesh in [(1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]:
        n = rows[mesh]["numbers"]
        assert n["all-reduce.n"] >= 3, mesh                               # at least once per layer
        assert 0 < n["link_bytes"] < 1e9, mesh


def test_memory_per_device_matches_the_split(report):
    rows = _rows(report[1])
    full = rows[(8, 1, 1)]["plan"]["params"]                              # data only: a whole copy per device
    for mesh in [(1, 8, 1), (1, 1, 8), (1, 2, 4)]:
        assert rows[mesh]["plan"]["params"] <= 1.5 * full / 8, mesh       # norms / small biases replicated
    for mesh, r in rows.items():
        n, plan = r["numbers"], r["plan"]
        planned = plan["llm_params"] + plan["kv"]
        # The compiled step's arguments are the LLM's pieces and the cache (+ tokens, positions, key_valid).
        assert planned <= n["mem.argument"] <= planned + 8 * (256 + 8) + 4, mesh
        assert n["mem.alias"] > 0 and n["mem.temp"] > 0, mesh            # the cache is donated
