"""What a model name points to: a local folder, ``demo``, or a Hugging Face Hub id.

:func:`resolve_model` is what every ``from_pretrained`` accepts:

* ``demo`` → the tiny random-weight demo checkpoint (built once, see :mod:`minicpmv_jax.demo`);
* an existing folder (``~`` expanded) → itself;
* a Hub id (``owner/name``) → the folder ``minicpmv-jax`` converted it to before, if any
  (:func:`converted_cache_dir`), else its files downloaded with ``huggingface_hub`` (the ``hub`` extra)
  into the Hub's own cache — the weights only when they are asked for, so a processor downloads only its
  config and tokenizer files.

Converting a Hub checkpoint once to the Orbax format (faster loads, each device reading only its shards)
is the command line's job (``--model`` of ``chat`` / ``generate`` / ``finetune``, see
:func:`minicpmv_jax.cli_generate.model_folder`); this module sits below the model and never converts.
"""

from __future__ import annotations

import os

from minicpmv_jax.demo import DEMO_NAME, cache_root, demo_checkpoint
from minicpmv_jax.checkpoint_files import AUX_PATTERNS, WEIGHT_PATTERNS, is_converted
from minicpmv_jax.hf_checkpoint import CheckpointError, is_hub_id

__all__ = ["converted_cache_dir", "download", "resolve_model"]


def converted_cache_dir(hub_id: str) -> str:
    """The cache folder of the converted checkpoint of ``hub_id``."""
    return os.path.join(cache_root(), "converted", hub_id.replace("/", "--"))


def download(hub_id: str, weights: bool = True) -> str:
    """The local snapshot folder of the Hub repository ``hub_id`` (downloaded as needed): the weights and
    the files besides them, or (``weights=False``) those files only.

    Raises:
      CheckpointError: ``huggingface_hub`` is not installed, or the download failed (offline, unknown
        repository, gated, …); one line naming the id.
    """
    try:
        import huggingface_hub  # the `hub` extra: imported only for Hub ids
    except ImportError:
        raise CheckpointError(f"{hub_id}: no such folder; to download it from the Hugging Face Hub, install the "
                              "`hub` extra (pip install 'minicpmv-jax[hub]')") from None
    patterns = [*WEIGHT_PATTERNS, *AUX_PATTERNS] if weights else list(AUX_PATTERNS)
    try:
        return huggingface_hub.snapshot_download(repo_id=hub_id, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated, HTTP errors: one line naming the id
        why = " ".join(str(e).split())  # Hub errors span lines; ours is one
        raise CheckpointError(f"{hub_id}: no such folder, and downloading it from the Hugging Face Hub failed "
                              f"({type(e).__name__}: {why})") from None


def resolve_model(spec: str | os.PathLike, weights: bool = True, converted: bool = True) -> str:
    """A loadable checkpoint folder for ``spec``: a folder (``~`` expanded), ``"demo"`` or a Hub id (see
    the module docstring); ``weights=False`` when only the config and tokenizer files are needed,
    ``converted=False`` when a Hub id must give its HF files (for the converter), never a converted folder.

    Raises:
      CheckpointError: ``spec`` is neither a folder nor a reachable Hub id, in one line that says which
        and what to do.
    """
    spec = os.fspath(spec)
    if spec == DEMO_NAME:
        return demo_checkpoint()
    folder = os.path.expanduser(spec)
    if os.path.isdir(folder):
        return folder
    if os.path.exists(folder):
        raise CheckpointError(f"{spec}: not a directory (expected a checkpoint folder, a Hub id or 'demo')")
    if not is_hub_id(spec):
        raise CheckpointError(f"{spec}: no such folder")
    cached = converted_cache_dir(spec)
    if converted and is_converted(cached):
        return cached
    return download(spec, weights)
