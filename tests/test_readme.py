"""The README's Python examples run as written, so that the README cannot drift from the code.

Every ```python block of README.md is executed as a user would run it: in a folder holding the files it
names (``photo.jpg``, ``clip.mp4``, ``train.json``), with ``HOME`` pointing at a temporary folder whose
``~/MiniCPM-V-2_6`` is a tiny random-weight checkpoint in the HF layout (the demo model's). One change
is made, and checked to apply: the fine-tuning example's 1000 steps become 4 (with 1 of warmup; on the 8 simulated
devices of the tests a step of the 8-way FSDP example takes about 2 s).
"""

from __future__ import annotations

import fractions
import json
import pathlib
import re

import av
import numpy as np
import pytest
from PIL import Image

from minicpmv_jax.demo import demo_checkpoint

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


# The fine-tuning example's length, cut for the test (see the module docstring).
_SHORTER = {"warmup_steps=50": "warmup_steps=1", "total_steps=1000": "total_steps=4", "save_every=200": "save_every=2"}


def _write_clip(path: pathlib.Path, seconds: int = 3, rate: int = 4) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fractions.Fraction(rate))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * rate):
            pixels = np.full((48, 64, 3), (i * 20) % 256, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory):
    """(home, working folder, cache): the checkpoint at ~/MiniCPM-V-2_6 and the files the examples open."""
    root = tmp_path_factory.mktemp("readme")
    home, work, cache = root / "home", root / "work", root / "cache"
    for d in (home, work, cache):
        d.mkdir()
    (home / "MiniCPM-V-2_6").symlink_to(demo_checkpoint(str(cache)))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(work / "photo.jpg")
    _write_clip(work / "clip.mp4")
    samples = [{"id": str(i), "image": "photo.jpg",
                "conversations": [{"role": "user", "content": "<image>\nWhat is this?"},
                                  {"role": "assistant", "content": f"Picture {i}."}]} for i in range(8)]
    (work / "train.json").write_text(json.dumps(samples))
    return home, work, cache


def test_the_readme_has_its_python_examples():
    assert len(BLOCKS) >= 4
    for long in _SHORTER:  # the shortened example is still there
        assert sum(long in b for b in BLOCKS) == 1, long
    assert any('"~/MiniCPM-V-2_6"' in b and "model.chat(" in b and "compute_logits" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, user_folders, monkeypatch):
    home, work, cache = user_folders
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(cache))
    monkeypatch.chdir(work)
    block = BLOCKS[index]
    for long, short in _SHORTER.items():
        if long in block:
            block = block.replace(long, short)
            assert "fit(" in block, "only the fine-tuning example is shortened"
    code = compile(block, f"README.md, python block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})
