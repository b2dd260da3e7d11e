"""Exact position ids of the variable-resolution SigLIP encoder (docs/model.md §3), host-side numpy.

The position table is a ``side × side`` grid (70 × 70 for the released model). A piece whose patch grid is
``H × W`` is mapped onto it by bucketing fractional coordinates::

    id(r, c) = bucket_H(r) · side + bucket_W(c)

Mathematically ``bucket_H(r) = floor(side · r / H)``, but the reference computes the fractional coordinates
with ``torch.arange`` in float32 and buckets them with ``torch.bucketize``, so at exact ties
(``side · r / H`` an integer k) it yields k or k − 1 depending on rounding. :func:`bucket_coords` reproduces
that arithmetic bit for bit (checked for every H from 1 to 700 against torch in the tests). It depends only
on ``H`` and ``side``, so results are cached per size.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["bucket_coords", "position_ids"]

# torch's CPU ``arange`` fills a vectorised prefix (the largest multiple of _VECTOR_CHUNK elements) in blocks
# of _BLOCK steps: each block start ``start + j·step`` is rounded to float32, then the in-block offsets
# ``i·step`` are added to it in float64 and the sum rounded again. The tail is ``start + k·step`` rounded once.
_VECTOR_CHUNK = 16
_BLOCK = 8


def _torch_arange_f32(start: float, step: float, n: int) -> np.ndarray:
    """The ``n`` float32 values of torch's CPU ``arange(start, ·, step)`` (start, step as float64)."""
    k = np.arange(n, dtype=np.int64)
    block_start = (start + _BLOCK * (k // _BLOCK) * step).astype(np.float32).astype(np.float64)
    vectorised = block_start + (k % _BLOCK) * step
    scalar = start + k * step
    return np.where(k < n - n % _VECTOR_CHUNK, vectorised, scalar).astype(np.float32)


def _boundaries(side: int) -> np.ndarray:
    """``torch.arange(1/side, 1.0, 1/side)`` in float32 (for side 70: ``float32(1/70 + (k−1)/70)``, k = 1…69)."""
    step = 1.0 / side
    n = int(np.ceil((1.0 - step) / step))  # torch's arange length rule, in float64
    return _torch_arange_f32(step, step, n)


def _fractional_coords(n: int) -> np.ndarray:
    """``torch.arange(0, 1 - 1e-6, 1 / torch.tensor(n))``: n float32 values, the step being float32(1/n)."""
    return _torch_arange_f32(0.0, float(np.float32(1.0 / n)), n)


@functools.lru_cache(maxsize=4096)
def _bucket_coords(n: int, side: int) -> np.ndarray:
    coords = np.searchsorted(_boundaries(side), _fractional_coords(n), side="right").astype(np.int32)
    coords.flags.writeable = False  # cached and shared: nobody may modify it
    return coords


def bucket_coords(n: int, side: int = 70) -> np.ndarray:
    """Row (or column) buckets of an ``n``-patch side: int32 ``[n]`` in ``[0, side)``, read-only.

    Equals ``torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(n)),
    torch.arange(1 / side, 1.0, 1 / side), right=True)``.
    """
    if n < 1:
        raise ValueError(f"a patch grid side must be at least 1, got {n}")
    return _bucket_coords(int(n), int(side))


@functools.lru_cache(maxsize=4096)
def _position_ids(height: int, width: int, side: int) -> np.ndarray:
    ids = (bucket_coords(height, side)[:, None] * side + bucket_coords(width, side)[None, :]).reshape(-1)
    ids.flags.writeable = False
    return ids


def position_ids(height: int, width: int, side: int = 70) -> np.ndarray:
    """Position-table ids of an ``height × width`` patch grid, row-major: int32 ``[height · width]``, read-only."""
    if height < 1 or width < 1:
        raise ValueError(f"a patch grid must be at least 1×1, got {height}×{width}")
    return _position_ids(int(height), int(width), int(side))
