"""Atomic output: the converted folder is built in a staging folder beside DST and renamed into place.

A failure at any point (bad input found late, a write error, Ctrl-C) removes the staging folder and leaves
DST as it was: absent, or the previous converted checkpoint when replacing one with ``overwrite``. Only a
folder that ``minicpmv-jax convert`` wrote (or an empty one) is ever replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

from minicpmv_jax.orbax_checkpoint import is_converted

from ._errors import ConvertError

STAGING_TAG = ".convert-staging-"
BACKUP_TAG = ".convert-replaced-"


def check_destination(dst: str, src: str, overwrite: bool) -> None:
    """Refuses, before any work, a DST that must not be written: it exists (without ``overwrite``), it is
    not ours to replace, it is or contains the source, or its parent folder does not exist."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ConvertError(f"{dst}: the parent folder {parent} does not exist")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if os.path.exists(src) and (real_dst == real_src or real_src.startswith(real_dst.rstrip(os.sep) + os.sep)):
        raise ConvertError(f"{dst}: is or contains the source folder {src}; choose another destination")
    if os.path.lexists(dst):
        if not overwrite:
            raise ConvertError(f"{dst}: already exists; pass --overwrite to replace it")
        _check_replaceable(dst)


def _check_replaceable(dst: str) -> None:
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise ConvertError(f"{dst}: exists and is not a folder; refusing to replace it")
    if os.listdir(dst) and not is_converted(dst):
        raise ConvertError(f"{dst}: exists and was not written by minicpmv-jax convert; refusing to replace it")


@contextlib.contextmanager
def staged(dst: str, overwrite: bool) -> Iterator[str]:
    """Yields an empty staging folder beside ``dst``; on a clean exit it becomes ``dst``, else it is removed."""
    tmp = _sibling(dst, STAGING_TAG)
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise ConvertError(f"{dst}: cannot create the staging folder {tmp} ({e})") from None
    try:
        yield tmp
        try:
            commit(tmp, dst, overwrite)
        except OSError as e:
            raise ConvertError(f"{dst}: cannot move the converted folder into place ({e}); {dst} was left "
                               "as it was") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: str, dst: str, overwrite: bool) -> None:
    """Renames the finished ``tmp`` to ``dst``, replacing a previous converted folder when allowed."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if not overwrite:
        raise ConvertError(f"{dst}: appeared while converting; pass --overwrite to replace it")
    _check_replaceable(dst)
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
