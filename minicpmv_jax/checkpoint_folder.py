"""Writing a converted folder atomically: refusing a destination, staging, the swap, the copied files.

Shared by every writer of converted folders (:mod:`minicpmv_jax.orbax_checkpoint`'s layout): the converter
(``minicpmv_jax.convert_weights``) and fine-tuning's export (:mod:`minicpmv_jax.finetune.export`).

* :func:`check_destination` refuses, before any work, a destination that must not be written.
* :func:`staged` yields a staging folder beside the destination; on a clean exit it is renamed into place
  (:func:`commit`), else removed. A failure at any point (bad input found late, a write error, Ctrl-C)
  leaves the destination as it was: absent, or the previous converted folder when replacing one with
  ``overwrite``. Only a converted folder (or an empty one) is ever replaced.
* :func:`copy_aux_files` copies the files besides the weights (config, tokenizer, preprocessor, generation
  defaults) unchanged.

Errors are :class:`~minicpmv_jax.hf_checkpoint.CheckpointError`, or the subclass a caller passes as
``error`` (the converter's ``ConvertError``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import uuid
from typing import Iterator

from minicpmv_jax.checkpoint_files import AUX_PATTERNS, INDEX_FILE, MANIFEST_FILE, is_converted
from minicpmv_jax.hf_checkpoint import CheckpointError

__all__ = ["check_destination", "staged", "commit", "aux_files", "copy_aux_files"]

STAGING_TAG = ".convert-staging-"
BACKUP_TAG = ".convert-replaced-"


# --------------------------------------------------------------------------- the destination


def check_destination(dst: str, src: str, overwrite: bool, *,
                      error: type[CheckpointError] = CheckpointError) -> None:
    """Refuses, before any work, a DST that must not be written: it exists (without ``overwrite``), it is
    not ours to replace, it is or contains the source, or its parent folder does not exist."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise error(f"{dst}: the parent folder {parent} does not exist")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if os.path.exists(src) and (real_dst == real_src or real_src.startswith(real_dst.rstrip(os.sep) + os.sep)):
        raise error(f"{dst}: is or contains the source folder {src}; choose another destination")
    if os.path.lexists(dst):
        if not overwrite:
            raise error(f"{dst}: already exists; pass --overwrite to replace it")
        _check_replaceable(dst, error)


def _check_replaceable(dst: str, error: type[CheckpointError]) -> None:
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise error(f"{dst}: exists and is not a folder; refusing to replace it")
    if os.listdir(dst) and not is_converted(dst):
        raise error(f"{dst}: exists and was not written by minicpmv-jax convert; refusing to replace it")


# --------------------------------------------------------------------------- staging and the swap


@contextlib.contextmanager
def staged(dst: str, overwrite: bool, *, error: type[CheckpointError] = CheckpointError) -> Iterator[str]:
    """Yields an empty staging folder beside ``dst``; on a clean exit it becomes ``dst``, else it is removed."""
    tmp = _sibling(dst, STAGING_TAG)
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise error(f"{dst}: cannot create the staging folder {tmp} ({e})") from None
    try:
        yield tmp
        try:
            commit(tmp, dst, overwrite, error=error)
        except OSError as e:
            raise error(f"{dst}: cannot move the converted folder into place ({e}); {dst} was left "
                        "as it was") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: str, dst: str, overwrite: bool, *, error: type[CheckpointError] = CheckpointError) -> None:
    """Renames the finished ``tmp`` to ``dst``, replacing a previous converted folder when allowed."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if not overwrite:
        raise error(f"{dst}: appeared while converting; pass --overwrite to replace it")
    _check_replaceable(dst, error)
    old = _sibling(dst, BACKUP_TAG)
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sibling(dst: str, tag: str) -> str:
    """A fresh hidden name in ``dst``'s folder (same file system, so renames are atomic)."""
    path = os.path.abspath(dst).rstrip(os.sep)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{tag}{uuid.uuid4().hex[:12]}")


# --------------------------------------------------------------------------- the files besides the weights


def aux_files(folder: str) -> list[str]:
    """Names of the non-weight files to copy (config, tokenizer, preprocessor, generation config); never
    the weight index, nor the manifest of a converted folder (each converted folder writes its own)."""
    return sorted(name for name in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, name)) and name not in (INDEX_FILE, MANIFEST_FILE)
                  and any(fnmatch.fnmatch(name, p) for p in AUX_PATTERNS))


def copy_aux_files(src: str, dst: str) -> list[str]:
    """Copies :func:`aux_files` of ``src`` into ``dst`` unchanged; returns their names."""
    names = aux_files(src)
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names
