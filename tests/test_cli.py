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
