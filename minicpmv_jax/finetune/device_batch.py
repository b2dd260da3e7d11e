"""Host batches → the fixed-shape arrays one train step takes: micro-batches stacked, images packed.

A train step runs ``A = grad_accum_steps`` micro-batches (a ``lax.scan``), so their arrays are stacked on
a leading axis and must share one shape: :func:`pack_batches` left-pads every micro-batch to the largest
``[B, L]`` among them (extra rows are padding rows: all-False masks) and packs each micro-batch's image
pieces for the encoder with the model's own :func:`~minicpmv_jax.image_inputs.build_image_inputs`, then
pads the piece and patch counts of all of them to one bucket: the piece-count bucket of the largest count
(:func:`~minicpmv_jax.image_inputs.pieces_bucket`) and the patch-length bucket of the longest piece
(:func:`~minicpmv_jax.patches.padded_length`), the buckets ``MiniCPMV.compute_logits`` uses. So images of
other sizes in the same buckets give the same shapes and reuse the compiled step. Padding is masked: empty
pieces (no valid patch, grid 0×0) are used by no token, padding patches are no piece's keys, so the loss
and the gradients do not change. A step without any image carries ``images=None`` and compiles a
text-only program.

The input is the fine-tuning batch contract (issue 7; :class:`minicpmv_jax.finetune.data.FinetuneDataset`
yields it): ``input_ids`` int [B, L] left-padded with 0, ``attention_mask`` bool [B, L], ``loss_mask`` bool
[B, L], and the processor's ``image_bound`` / ``pixel_values`` (docs/model.md §8).

Placement (:func:`batch_shardings`): the token arrays ``[A, B, L]`` split B like any batch (``data``, then
``fsdp``, see :mod:`minicpmv_jax.sharding.rules`); the encoder inputs are replicated, as in ``MiniCPMV.compute_logits``.

Shape letters as in ``minicpmv_jax/layers.py``; A micro-batches, N pieces, P patches, C patch channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from minicpmv_jax import sharding
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.host import place
from minicpmv_jax.image_inputs import batch_image_inputs

__all__ = ["ImageArrays", "TrainBatch", "pack_batches", "batch_shardings", "put_batch"]

_REQUIRED = ("input_ids", "attention_mask", "loss_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """Encoder inputs of every micro-batch: ``patches`` float32 [A, N, P, C], ``pos_ids`` int32 [A, N, P],
    ``valid`` bool [A, N, P], ``tgt_sizes`` int32 [A, N, 2], and ``feature_index`` int32 [A, B, L] (the row
    of the micro-batch's flattened features ``[N·Q, D]`` each token slot takes, or −1)."""

    patches: Any
    pos_ids: Any
    valid: Any
    tgt_sizes: Any
    feature_index: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """``A`` micro-batches of one train step: ``input_ids`` int32, ``attention_mask`` and ``loss_mask``
    bool, all [A, B, L]; ``images`` or None for a text-only step."""

    input_ids: Any
    attention_mask: Any
    loss_mask: Any
    images: ImageArrays | None = None

    @property
    def num_micro_batches(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_target_tokens(self) -> int:
        """Target tokens of the whole step (the loss's denominator)."""
        return int(np.asarray(self.loss_mask)[:, :, 1:].sum())


def _check(batch: Mapping[str, Any], i: int) -> tuple[np.ndarray, ...]:
    missing = [k for k in _REQUIRED if k not in batch]
    if missing:
        raise ValueError(f"micro-batch {i}: missing key {missing[0]!r} (a fine-tuning batch holds {_REQUIRED} "
                         "and the processor's image_bound / pixel_values)")
    ids, mask, loss = (np.asarray(batch[k]) for k in _REQUIRED)
    if ids.ndim != 2 or mask.shape != ids.shape or loss.shape != ids.shape:
        raise ValueError(f"micro-batch {i}: input_ids, attention_mask and loss_mask must be [B, L] of one shape, "
                         f"got {ids.shape}, {mask.shape}, {loss.shape}")
    return ids, mask, loss


def _pad_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pads ``x`` at the end of every axis up to ``shape``."""
    return np.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def pack_batches(batches: Sequence[Mapping[str, Any]], config: MiniCPMVConfig) -> TrainBatch:
    """Stacks host micro-batches into one :class:`TrainBatch` of numpy arrays (see the module docstring).

    ``config`` gives the resampler's query count and the encoder's patch size and position grid.
    """
    if not batches:
        raise ValueError("pack_batches: no micro-batch given")
    checked = [_check(b, i) for i, b in enumerate(batches)]
    rows = max(ids.shape[0] for ids, _, _ in checked)
    length = max(ids.shape[1] for ids, _, _ in checked)
    a = len(batches)
    ids_out = np.zeros((a, rows, length), np.int32)
    masks = np.zeros((2, a, rows, length), bool)
    packed = []
    for i, (batch, (ids, mask, loss)) in enumerate(zip(batches, checked)):
        b, t = ids.shape
        offset = length - t                                    # more left padding for a shorter micro-batch
        ids_out[i, :b, offset:] = ids
        masks[0, i, :b, offset:] = mask
        masks[1, i, :b, offset:] = loss
        packed.append(_images(batch, (rows, length), offset, config, i))
    images = None
    if any(p is not None for p in packed):
        # Each micro-batch is bucketed already (build_image_inputs: piece and patch buckets, closed under
        # max), so the step takes the largest micro-batch's buckets.
        n = max(p.patches.shape[0] for p in packed if p is not None)
        p_len = max(p.patches.shape[1] for p in packed if p is not None)
        empty = {"patches": np.zeros((n, p_len, config.vision.patch_dim), np.float32),
                 "pos_ids": np.zeros((n, p_len), np.int32), "valid": np.zeros((n, p_len), bool),
                 "tgt_sizes": np.zeros((n, 2), np.int32),
                 "feature_index": np.full((rows, length), -1, np.int32)}   # already [B, L]: never padded
        images = ImageArrays(**{k: np.stack([e if p is None else _pad_to(np.asarray(getattr(p, k)), e.shape)
                                             for p in packed]) for k, e in empty.items()})
    return TrainBatch(ids_out, masks[0], masks[1], images)


def _images(batch: Mapping[str, Any], shape: tuple[int, int], offset: int, config: MiniCPMVConfig, i: int):
    """One micro-batch's pieces packed for the encoder (``ImageInputs``), or None without images."""
    try:
        return batch_image_inputs(batch, shape, [offset] * len(batch["input_ids"]), config)
    except ValueError as e:
        raise ValueError(f"micro-batch {i}: {e}") from None


def batch_shardings(batch: TrainBatch, mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.RULES) -> TrainBatch:
    """A :class:`TrainBatch` of ``NamedSharding``: token arrays split along B (the rules' ``batch`` row),
    encoder inputs replicated."""
    a, b, length = batch.input_ids.shape
    tokens = NamedSharding(mesh, PartitionSpec(None, *sharding.batch_spec((b, length), mesh, rules)))
    replicated = NamedSharding(mesh, PartitionSpec())
    images = None
    if batch.images is not None:
        images = ImageArrays(replicated, replicated, replicated, replicated, tokens)
    return TrainBatch(tokens, tokens, tokens, images)


def put_batch(batch: TrainBatch, mesh: jax.sharding.Mesh | None, rules: sharding.Rules = sharding.RULES) -> TrainBatch:
    """The host :class:`TrainBatch` on ``mesh`` (each device gets its slice; every process passes the same
    host arrays), or on the default device without a mesh."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, batch)
    return jax.tree.map(place, batch, batch_shardings(batch, mesh, rules))
