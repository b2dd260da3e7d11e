"""Host-side shape policy for token batches: power-of-two buckets, and left-padding a batch to them.

Compiled programs see only bucketed shapes, so that varied requests reuse them: a batch of B prompts of
T tokens runs as ``[bucket(B, 1), bucket(T, MIN_LENGTH)]``, each real row's tokens at the right end of its
row (left padding, as generation needs), padding rows after the real ones. Used by
:meth:`minicpmv_jax.model.MiniCPMVModel.compute_logits` and :func:`minicpmv_jax.generate.prepare_batch`; image
pieces have their own buckets (:func:`minicpmv_jax.image_inputs.pieces_bucket`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["MIN_LENGTH", "LeftPadded", "bucket", "pad_left"]

#: The shortest padded token length (prompt lengths, and the generated-token buffer).
MIN_LENGTH = 16


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two ≥ max(n, minimum): lengths and batch sizes share compiled programs."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class LeftPadded(NamedTuple):
    """A ``[B, T]`` batch padded to ``[B', T']`` buckets: rows ``[:B]`` hold it in columns ``[offset:]``."""

    ids: np.ndarray     # int32 [B', T'], 0 where padded
    mask: np.ndarray    # bool [B', T'], False where padded
    offset: int         # T' − T: the left padding of every real row


def pad_left(ids: np.ndarray, mask: np.ndarray) -> LeftPadded:
    """Left-pads token ids and attention mask ``[B, T]`` to ``[bucket(B, 1), bucket(T, MIN_LENGTH)]``."""
    b, t = ids.shape
    bb, bt = bucket(b, 1), bucket(t, MIN_LENGTH)
    ids_p = np.zeros((bb, bt), np.int32)
    mask_p = np.zeros((bb, bt), bool)
    ids_p[:b, bt - t:] = ids
    mask_p[:b, bt - t:] = mask
    return LeftPadded(ids_p, mask_p, bt - t)
