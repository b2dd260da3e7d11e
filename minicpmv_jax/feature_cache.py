"""The vision-feature cache: each image piece is encoded once per model, then looked up by its pixels.

A follow-up question about the same image, or a video whose frames repeat, does not run the vision tower
again. The cache maps a digest of a piece's pixels (float32 ``[3, h, w]``) to its resampled features
``[Q, D]`` on the model's devices, least recently used first out, and is kept per model outside the NNX
module (the module's state stays parameters only). Used by generation's batch preparation
(:func:`minicpmv_jax.generate.prepare_batch`), hence by ``chat`` and the CLI.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import weakref
from typing import Any, Sequence

import jax
import numpy as np

from minicpmv_jax.image_inputs import pack_for_encoder

__all__ = ["FEATURE_CACHE_SIZE", "ENCODE_GROUP", "FeatureCacheStats", "feature_cache_stats", "encode_pieces"]

# Per model: piece digest → features [Q, D] on device (LRU). Kept outside the NNX module so that the
# module's state stays parameters only.
_FEATURE_CACHES: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()
FEATURE_CACHE_SIZE = 256  # pieces (a 1344² image is 10)
#: New pieces are encoded this many at a time: a 64-frame video brings ~192, and the encoder's dense
#: attention over a batch of them ([pieces, heads, 1024, 1024] float32 on an accelerator) would take tens
#: of GB at once. Every group but the last has this size, so groups share one compiled program.
ENCODE_GROUP = 32


@dataclasses.dataclass
class FeatureCacheStats:
    hits: int = 0
    misses: int = 0


_STATS: "weakref.WeakKeyDictionary[Any, FeatureCacheStats]" = weakref.WeakKeyDictionary()


def feature_cache_stats(model) -> FeatureCacheStats:
    """Hits and misses of ``model``'s piece-feature cache (pieces encoded = misses)."""
    return _STATS.setdefault(model, FeatureCacheStats())


def _digest(piece: np.ndarray) -> bytes:
    piece = np.ascontiguousarray(piece, np.float32)
    return hashlib.blake2b(piece.tobytes(), digest_size=16, person=str(piece.shape).encode()[:16]).digest()


def encode_pieces(model, pieces: Sequence[np.ndarray]) -> list[jax.Array]:
    """Features ``[Q, D]`` per piece; pieces seen before (same pixels) come from the cache."""
    cache = _FEATURE_CACHES.setdefault(model, collections.OrderedDict())
    stats = feature_cache_stats(model)
    keys = [_digest(p) for p in pieces]
    missing = list(dict.fromkeys(k for k in keys if k not in cache))
    stats.hits += len(keys) - len(missing)
    stats.misses += len(missing)
    if missing:
        first = {k: p for k, p in zip(keys, pieces)}
        cfg = model.config
        for g in range(0, len(missing), ENCODE_GROUP):
            group = missing[g:g + ENCODE_GROUP]
            arrays = pack_for_encoder([first[k] for k in group], patch_size=cfg.vision.patch_size,
                                      side=cfg.vision.num_patches_per_side)
            features = model.encode_pieces_packed(*arrays)
            for i, k in enumerate(group):
                cache[k] = features[i]
    out = []
    for k in keys:
        cache.move_to_end(k)
        out.append(cache[k])
    while len(cache) > FEATURE_CACHE_SIZE:
        cache.popitem(last=False)
    return out
