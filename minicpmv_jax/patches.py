"""Host-side batching of image pieces for the vision encoder (docs/model.md §3): patchify, pad, position ids.

Pieces of different grid sizes are padded to one patch count ``P`` taken from a small set of buckets, so
the jitted encoder compiles once per bucket rather than once per size. The sizes the slicer produces are
almost all about 1024 patches (every piece is resized to roughly ``448²`` pixels; rounding each side to a
multiple of 14 adds up to ~4 %), hence the buckets just above 1024. Counts beyond the last bucket round up
to a multiple of :data:`LARGE_PATCH_MULTIPLE` (very elongated images reach a few thousand patches).

Padded patches are zeros with position id 0 and ``valid = False``; the encoder masks them as attention
keys and the resampler ignores them. Their encoder outputs are garbage and must never be read.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from einops import rearrange

from minicpmv_jax.position_buckets import position_ids

__all__ = ["DEFAULT_PATCH_BUCKETS", "LARGE_PATCH_MULTIPLE", "patchify", "padded_length", "pack_pieces"]

DEFAULT_PATCH_BUCKETS: tuple[int, ...] = (64, 256, 576, 1024, 1088, 1152, 1536, 2048)
LARGE_PATCH_MULTIPLE = 512


def patchify(pixel_values: np.ndarray, patch_size: int = 14) -> np.ndarray:
    """``[3, h, w]`` image → ``[P, C]`` patches, row-major over the grid, C ordered (channel, row, col).

    This is the order of a Conv2d weight ``[D, 3, p, p]`` flattened to ``[D, C]``.
    """
    if pixel_values.ndim != 3:
        raise ValueError(f"expected an image [channels, h, w], got shape {pixel_values.shape}")
    _, h, w = pixel_values.shape
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(f"image size {h}×{w} is not a positive multiple of patch_size={patch_size}")
    return rearrange(pixel_values, "ch (gh ph) (gw pw) -> (gh gw) (ch ph pw)", ph=patch_size, pw=patch_size)


def padded_length(num_patches: int, buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> int:
    """The smallest bucket ≥ ``num_patches``; beyond the last, the next multiple of LARGE_PATCH_MULTIPLE."""
    for b in sorted(buckets):
        if b >= num_patches:
            return b
    return -(-num_patches // LARGE_PATCH_MULTIPLE) * LARGE_PATCH_MULTIPLE


def pack_pieces(pixel_values: Sequence[np.ndarray], buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS, *,
                patch_size: int = 14, side: int = 70, batch_size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pads a list of pieces (float ``[3, h, w]``) into one encoder batch.

    Returns ``patches`` float32 ``[B, P, C]``, ``pos_ids`` int32 ``[B, P]``, ``valid`` bool ``[B, P]`` and
    ``tgt_sizes`` int32 ``[B, 2]`` (grid rows, cols). ``P`` is :func:`padded_length` of the largest piece;
    ``batch_size`` (≥ the number of pieces) adds empty pieces (all invalid, size 0×0) so that the batch
    dimension can be bucketed too. ``side`` is the position table's side (``VisionConfig.num_patches_per_side``).
    """
    num_pieces = len(pixel_values)
    b = num_pieces if batch_size is None else batch_size
    if b < num_pieces or b < 1:
        raise ValueError(f"batch_size={batch_size} cannot hold {num_pieces} pieces")
    flat = []
    for i, img in enumerate(pixel_values):
        img = np.asarray(img, dtype=np.float32)
        try:
            flat.append(patchify(img, patch_size))
        except ValueError as e:
            raise ValueError(f"piece {i}: {e}") from None
    channels = flat[0].shape[1] if flat else 3 * patch_size * patch_size
    p = padded_length(max((f.shape[0] for f in flat), default=1), buckets)

    patches = np.zeros((b, p, channels), np.float32)
    pos = np.zeros((b, p), np.int32)
    valid = np.zeros((b, p), bool)
    tgt_sizes = np.zeros((b, 2), np.int32)
    for i, (img, f) in enumerate(zip(pixel_values, flat)):
        if f.shape[1] != channels:
            raise ValueError(f"piece {i} has {img.shape[0]} channels, piece 0 has {channels // patch_size ** 2}")
        gh, gw = img.shape[1] // patch_size, img.shape[2] // patch_size
        n = gh * gw
        patches[i, :n] = f
        pos[i, :n] = position_ids(gh, gw, side)
        valid[i, :n] = True
        tgt_sizes[i] = gh, gw
    return patches, pos, valid, tgt_sizes
