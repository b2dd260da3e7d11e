"""The ``minicpmv-jax`` command line (the installed console script, as a user runs it)."""

import os
import shutil
import subprocess
import sys

import pytest

from minicpmv_jax import config as C
from minicpmv_jax.testing.checkpoint import write_checkpoint


def _cli():
    exe = shutil.which("minicpmv-jax", path=os.path.dirname(sys.executable)) or shutil.which("minicpmv-jax")
    assert exe, "the minicpmv-jax console script is not installed"
    return exe


def test_info_on_a_good_checkpoint(tmp_path):
    write_checkpoint(tmp_path, C.tiny(vocab_size=1009), num_shards=2, tokenizer=False)
    out = subprocess.run([_cli(), "info", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ": OK" in out.stdout and "3 layers, width 128" in out.stdout and "2 of 3 layers run" in out.stdout


def test_info_reports_a_broken_checkpoint_in_one_line(tmp_path):
    write_checkpoint(tmp_path, C.tiny(vocab_size=1009), num_shards=2, tokenizer=False)
    os.remove(tmp_path / "model-00001-of-00002.safetensors")
    out = subprocess.run([_cli(), "info", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "model-00001-of-00002.safetensors, which does not exist" in out.stderr


@pytest.mark.parametrize("argv", [["--version"], ["info", "--help"]])
def test_help_and_version(argv):
    out = subprocess.run([_cli(), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "minicpmv-jax" in out.stdout


def test_plan_prints_per_device_memory(capsys):
    from minicpmv_jax import cli

    assert cli.main(["plan", "--mesh", "1x8x1", "--batch", "2", "--max-len", "1024", "--device-memory", "16"]) == 0
    out = capsys.readouterr().out
    row = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # 8,083,935,648 bf16 parameters (DESIGN §2); fsdp=8 splits every matrix 8 ways, norms and a few
    # biases stay whole, so a device holds just over 1/8.
    params = 8_083_935_648 * 2 / 2**30
    assert row["all"][2] == "8,083,935,648" and float(row["all"][3]) == pytest.approx(params, abs=0.01)
    assert params / 8 - 0.005 <= float(row["all"][5]) <= params / 8 + 0.01  # printed to 0.01 GiB
    # KV cache: K and V × 28 layers × batch 2 × 1024 slots × 4 KV heads × 128 × 2 bytes; batch 2 does not
    # divide fsdp=8, so every device holds all of it.
    kv = 2 * 28 * 2 * 1024 * 4 * 128 * 2 / 2**30
    assert float(row["KV"][6]) == pytest.approx(kv, abs=0.01) and float(row["KV"][8]) == pytest.approx(kv, abs=0.01)
    assert "16 GiB per device" in out and "left for activations" in out


def test_plan_bad_mesh_is_one_line(capsys):
    from minicpmv_jax import cli

    assert cli.main(["plan", "--mesh", "2x2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2x2" in err and "DATAxFSDPxTENSOR" in err
