"""The names of the files in a checkpoint folder, and telling the two kinds of folder apart.

An HF folder (as downloaded) holds safetensors weights, optionally an index of them, and the files
besides the weights that loading needs (config, tokenizer, preprocessor, generation defaults). A folder
converted by ``minicpmv-jax convert`` (or exported by fine-tuning) holds those same files, an Orbax
``params/`` folder and a manifest. Plain names and patterns only, so that anything (the Hub resolver,
the processor) can ask without importing JAX or Orbax.
"""

from __future__ import annotations

import os

__all__ = ["INDEX_FILE", "SINGLE_FILE", "MANIFEST_FILE", "PARAMS_DIR", "AUX_PATTERNS", "WEIGHT_PATTERNS",
           "is_converted"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FILE = "convert_manifest.json"
PARAMS_DIR = "params"

# The files besides the weights (copied by conversion, downloaded with or without the weights) and the
# weights themselves.
AUX_PATTERNS = ("*.json", "*.txt", "*.jinja")
WEIGHT_PATTERNS = ("*.safetensors", INDEX_FILE)


def is_converted(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by ``minicpmv-jax convert`` or fine-tuning's export (it holds the
    manifest)."""
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE))
