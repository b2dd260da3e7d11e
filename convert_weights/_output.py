"""The converter's atomic output: :mod:`minicpmv_jax.checkpoint_folder`'s helpers, raising ``ConvertError``.

The converted folder is built in a staging folder beside DST and renamed into place; a failure at any point
leaves DST as it was (see :mod:`minicpmv_jax.checkpoint_folder`, shared with fine-tuning's export).
"""

from __future__ import annotations

from typing import ContextManager

from minicpmv_jax import checkpoint_folder

from ._errors import ConvertError


def check_destination(dst: str, src: str, overwrite: bool) -> None:
    """:func:`minicpmv_jax.checkpoint_folder.check_destination`, raising :class:`ConvertError`."""
    checkpoint_folder.check_destination(dst, src, overwrite, error=ConvertError)


def staged(dst: str, overwrite: bool) -> ContextManager[str]:
    """:func:`minicpmv_jax.checkpoint_folder.staged`, raising :class:`ConvertError`."""
    return checkpoint_folder.staged(dst, overwrite, error=ConvertError)
