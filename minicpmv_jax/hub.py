"""Where a ``--model`` argument points: a local folder, ``demo``, or a Hugging Face Hub id.

A Hub id is downloaded with ``huggingface_hub`` (the ``hub`` extra) and converted once to the Orbax
format (``convert_weights``); later runs load the converted folder from the cache directly.
"""

from __future__ import annotations

import os

from minicpmv_jax.demo import DEMO_NAME, cache_root, demo_checkpoint
from minicpmv_jax.hf_checkpoint import CheckpointError, is_hub_id

__all__ = ["resolve_model", "converted_cache_dir"]


def converted_cache_dir(hub_id: str) -> str:
    """The cache folder of the converted checkpoint of ``hub_id``."""
    return os.path.join(cache_root(), "converted", hub_id.replace("/", "--"))


def resolve_model(spec: str | os.PathLike) -> str:
    """A loadable checkpoint folder for ``spec``; what ``from_pretrained`` and ``--model`` accept.

    ``demo`` → the tiny random demo checkpoint (built once, see :mod:`minicpmv_jax.demo`); an existing
    folder → itself, with ``~`` expanded; otherwise a Hugging Face Hub id (``owner/name``) → downloaded and
    converted once into :func:`converted_cache_dir`, then loaded from there.

    Raises:
      minicpmv_jax.CheckpointError: ``spec`` is neither a folder nor a reachable Hub id (offline, or
        ``huggingface_hub`` not installed), with one line that says which and what to do.
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
    from minicpmv_jax.orbax_checkpoint import is_converted

    cached = converted_cache_dir(spec)
    if is_converted(cached):
        return cached
    from minicpmv_jax.convert_weights import convert, resolve_source  # needs Orbax; only for Hub ids

    convert(resolve_source(spec), cached)  # ConvertError (a CheckpointError) names the id on failure
    return cached
