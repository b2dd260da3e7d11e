"""``--model demo``: a tiny random-weight MiniCPM-V checkpoint, built once and cached.

It lets the whole pipeline (processor, vision tower, resampler, LLM, generation, CLI) run on any machine
in seconds, offline. Its answers are noise: the weights are random and the vocabulary is one token per
byte (256 tokens plus MiniCPM-V's 23 special tokens), so it needs no downloaded tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from minicpmv_jax import config as C

__all__ = ["DEMO_NAME", "DEMO_NOTICE", "cache_root", "demo_config", "demo_checkpoint"]

DEMO_NAME = "demo"
DEMO_NOTICE = ("note: --model demo is a tiny model with RANDOM weights, built to try the pipeline offline; "
               "its answers are noise")
_DEMO_VERSION = 1
_VOCAB = 256 + 23  # byte-level BPE without merges + MiniCPM-V's special tokens


def cache_root() -> str:
    """Where minicpmv-jax caches files: ``$MINICPMV_JAX_CACHE``, else ``$XDG_CACHE_HOME/minicpmv-jax``,
    else ``~/.cache/minicpmv-jax``."""
    if os.environ.get("MINICPMV_JAX_CACHE"):
        return os.environ["MINICPMV_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minicpmv-jax")


def demo_config() -> C.MiniCPMVConfig:
    """The demo's sizes: :func:`minicpmv_jax.config.tiny` with the byte-level vocabulary."""
    return C.tiny(vocab_size=_VOCAB, num_layers=2, vision_layers=2)


def demo_checkpoint(root: str | None = None) -> str:
    """The demo checkpoint folder (HF layout), written on first use under :func:`cache_root`.

    Written to a temporary folder and renamed into place, so an interrupted build leaves nothing behind.
    """
    from minicpmv_jax.testing.checkpoint import write_checkpoint
    from minicpmv_jax.testing.tokenizer_files import byte_level_tokenizer_json

    root = cache_root() if root is None else root
    folder = os.path.join(root, f"demo-v{_DEMO_VERSION}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=root)
    try:
        write_checkpoint(tmp, demo_config(), seed=2026, num_shards=1, tokenizer=byte_level_tokenizer_json())
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
