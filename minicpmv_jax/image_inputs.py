"""Image pieces of a batch → vision-tower inputs, and resampled features → the LLM's ``<unk>`` spans.

The processor gives, per prompt, the pieces' pixels and ``image_bound`` (docs/model.md §6, §8): one span of
``Q = 64`` placeholder positions per piece, in piece order. Everything that depends on the *values* of
those lists is resolved here, on the host, into fixed-shape arrays, so that the compiled programs see
only bucketed shapes:

* :class:`ImageInputs` — every piece of the batch packed for the encoder (``patches [N, P, C]``,
  ``pos_ids``, ``valid``, ``tgt_sizes``; N and P bucketed), and ``feature_index [B, T]``: for each token
  slot, the row of the flattened resampler output ``[N·Q, D]`` that replaces its embedding, or −1.
* :func:`place_features` — the jittable scatter: embeddings ``[B, T, D]`` with the features written in.

Shape letters as in ``layers.py``: N pieces, P patches, C patch channels, Q resampler queries.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpmv_jax.patches import DEFAULT_PATCH_BUCKETS, pack_pieces

if TYPE_CHECKING:
    from minicpmv_jax.config import MiniCPMVConfig

__all__ = ["ImageInputs", "batch_image_inputs", "build_image_inputs", "feature_slots", "pack_for_encoder",
           "place_features", "pieces_bucket"]


#: Piece-batch sizes: powers of two, plus 10 — one image at the default max_slice_nums=9 (overview and a
#: 3×3 grid) would otherwise be padded to 16, 60 % wasted encoder work. Beyond 16, multiples of 16.
PIECE_BUCKETS = (1, 2, 4, 8, 10, 16)


def pieces_bucket(n: int) -> int:
    """Piece-batch size a batch of ``n`` pieces is padded to (see :data:`PIECE_BUCKETS`)."""
    for b in PIECE_BUCKETS:
        if n <= b:
            return b
    return -(-n // 16) * 16


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    """Host arrays for the vision tower and the feature scatter of one (padded) batch.

    Attributes:
      patches: float32 ``[N, P, C]`` (padding pieces and patches are zeros).
      pos_ids: int32 ``[N, P]`` position-table ids.
      valid: bool ``[N, P]``, False for padding.
      tgt_sizes: int32 ``[N, 2]`` (rows, cols) per piece, 0×0 for padding pieces.
      feature_index: int32 ``[B, T]``, row of the flattened features ``[N·Q, D]`` for each token slot, or −1.
      num_pieces: how many of the N pieces are real.
    """

    patches: np.ndarray
    pos_ids: np.ndarray
    valid: np.ndarray
    tgt_sizes: np.ndarray
    feature_index: np.ndarray
    num_pieces: int


def feature_slots(
    image_bound: Sequence[np.ndarray],
    num_pieces: Sequence[int],
    shape: tuple[int, int],
    offsets: Sequence[int] | None = None,
    num_queries: int = 64,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Maps placeholder spans to feature rows.

    Args:
      image_bound: per prompt, int ``[n_i, 2]`` spans ``[start, end)`` in that prompt's row of the batch.
      num_pieces: per prompt, how many pieces it has.
      shape: ``(B, T)`` of the (possibly padded) token batch the spans are placed into; B may exceed the
        number of prompts (extra rows get no features).
      offsets: per prompt, how far its row was shifted right after the processor built it (extra left
        padding added by bucketing); default 0.
      num_queries: Q, the placeholder length of one piece.

    Spans and pieces are matched in order. A prompt may have fewer spans than pieces (``max_length`` cut
    a placeholder away): only its first pieces are used. More spans than pieces, or a span that is not
    Q long or falls outside the row, is an error naming the prompt.

    Returns:
      ``feature_index`` int32 ``[B, T]`` (the used pieces' features flattened to ``[n·Q, D]``, −1 where no
      feature goes) and the used pieces as ``(prompt, piece)`` pairs, in feature order.
    """
    rows, length = shape
    if len(image_bound) != len(num_pieces):
        raise ValueError(f"image_bound has {len(image_bound)} entries but pixel_values {len(num_pieces)}: "
                         "give one per prompt")
    if len(image_bound) > rows:
        raise ValueError(f"{len(image_bound)} prompts do not fit a batch of {rows} rows")
    offsets = [0] * len(image_bound) if offsets is None else list(offsets)
    used: list[tuple[int, int]] = []
    feature_index = np.full((rows, length), -1, np.int32)
    for b, (bounds, count) in enumerate(zip(image_bound, num_pieces)):
        bounds = np.asarray(bounds, np.int64).reshape(-1, 2)
        if len(bounds) > count:
            raise ValueError(f"prompt {b}: {len(bounds)} image placeholder spans but only {count} image pieces")
        for j, (start, end) in enumerate(bounds.tolist()):
            if end - start != num_queries:
                raise ValueError(f"prompt {b}: image_bound span {j} [{start}, {end}) holds {end - start} "
                                 f"positions, expected {num_queries} (one per resampler query)")
            start += offsets[b]
            if start < 0 or start + num_queries > length:
                raise ValueError(f"prompt {b}: image_bound span {j} lies outside the row of length {length}")
            feature_index[b, start:start + num_queries] = np.arange(num_queries) + len(used) * num_queries
            used.append((b, j))
    return feature_index, used


def pack_for_encoder(pieces: Sequence[np.ndarray], *, patch_size: int = 14, side: int = 70,
                     buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> tuple[np.ndarray, ...]:
    """``pack_pieces`` with the piece count padded to :func:`pieces_bucket`: (patches, pos_ids, valid,
    tgt_sizes)."""
    return pack_pieces([np.asarray(p, np.float32) for p in pieces], buckets, patch_size=patch_size, side=side,
                       batch_size=pieces_bucket(len(pieces)))


def build_image_inputs(
    pixel_values: Sequence[Sequence[np.ndarray]],
    image_bound: Sequence[np.ndarray],
    shape: tuple[int, int],
    offsets: Sequence[int] | None = None,
    *,
    num_queries: int = 64,
    patch_size: int = 14,
    side: int = 70,
    buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
) -> ImageInputs | None:
    """Packs the pieces of a batch and maps them onto their placeholder spans (see :func:`feature_slots`).

    Args:
      pixel_values: per prompt, its pieces float32 ``[3, h, w]`` in placeholder order.
      image_bound, shape, offsets, num_queries: as in :func:`feature_slots`.

    Returns:
      The packed arrays, or None when no prompt has a span (a text-only batch).
    """
    feature_index, used = feature_slots(image_bound, [len(p) for p in pixel_values], shape, offsets, num_queries)
    if not used:
        return None
    pieces = [pixel_values[b][j] for b, j in used]
    patches, pos_ids, valid, tgt_sizes = pack_for_encoder(pieces, patch_size=patch_size, side=side,
                                                          buckets=buckets)
    return ImageInputs(patches, pos_ids, valid, tgt_sizes, feature_index, len(used))


def batch_image_inputs(batch: Mapping[str, Any], shape: tuple[int, int], offsets: Sequence[int],
                       config: "MiniCPMVConfig") -> ImageInputs | None:
    """:func:`build_image_inputs` of a processor batch (``image_bound``, ``pixel_values``) with ``config``'s
    resampler queries, patch size and position grid; None for a text-only batch."""
    bounds = batch.get("image_bound")
    if bounds is None or not any(len(bd) for bd in bounds):
        return None
    pixel_values = batch.get("pixel_values")
    if pixel_values is None:
        raise ValueError("the batch has image_bound spans but no pixel_values")
    return build_image_inputs(pixel_values, bounds, shape, offsets, num_queries=config.resampler.num_queries,
                              patch_size=config.vision.patch_size, side=config.vision.num_patches_per_side)


def place_features(x: jax.Array, features: jax.Array, feature_index: jax.Array) -> jax.Array:
    """Writes resampled features into token embeddings.

    ``x [B, T, D]`` embeddings, ``features [N, Q, D]``, ``feature_index [B, T]`` (row of ``[N·Q, D]`` or −1)
    → ``[B, T, D]``: slot (b, t) holds ``features.reshape(N·Q, D)[feature_index[b, t]]`` where the index is
    non-negative, ``x[b, t]`` elsewhere.
    """
    flat = features.reshape(-1, features.shape[-1]).astype(x.dtype)              # [N·Q, D]
    gathered = jnp.take(flat, jnp.maximum(feature_index, 0), axis=0)             # [B, T, D]
    return jnp.where((feature_index >= 0)[..., None], gathered, x)
