"""Fine-tuning batches: :class:`FinetuneDataset` — the validated samples of :mod:`minicpmv_jax.finetune.data`
in length buckets, in a deterministic per-epoch order, as left-padded rows with their image pieces.

Shape letters: B batch rows, L the batch's bucket length, T one sample's token count, n a row's
placeholder spans.

- **Buckets** — every batch is padded to one of a few lengths (``DataConfig.buckets``; default: powers of
  two from 64 below ``max_length``, then ``max_length``), so the train step compiles once per bucket.
- **Order** — :func:`epoch_batches` gives the sample indices of every batch of one epoch. It depends only
  on (lengths, batch size, shuffle, seed, epoch), so a run resumed at step k sees exactly the batches an
  uninterrupted run sees from step k on. With shuffling, samples are permuted by a generator seeded with
  ``(seed, epoch)``; with ``group_by_length`` they are then sorted by bucket (stably, so the order within
  a bucket stays random), cut into batches, and the full batches are shuffled again. Each batch then
  holds samples of one or two neighbouring buckets, which limits padding. A last partial batch, if any,
  always comes last.
- **Rows** — :func:`pad_left` places each sample's tokens at the right end of its row (left padding with
  id 0, as the processor does) and fills rows past the samples with empty padding rows. Image pieces are
  made again for every batch by the processor (validation only measured the images).
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Iterator, Sequence

import numpy as np

from minicpmv_jax.finetune.data import (BadSample, DataConfig, EncodedSample, RawSample, SampleError,
                                        check_workers, encode_samples, load_samples, parallel_map)
from minicpmv_jax.processor import IMAGE_TAG, MiniCPMVProcessor

__all__ = ["FinetuneDataset", "bucket_length", "epoch_batches", "pad_left"]


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ ``length`` (``buckets`` increasing).

    Raises:
      ValueError: ``length`` exceeds the largest bucket.
    """
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ValueError(f"a batch of {length} tokens fits none of the buckets {tuple(buckets)}")
    return buckets[i]


def epoch_batches(lengths: Sequence[int], batch_size: int, *, buckets: Sequence[int], shuffle: bool, seed: int,
                  epoch: int, group_by_length: bool = True) -> list[np.ndarray]:
    """The sample indices of each batch of ``epoch``, in the order they are trained on.

    Args:
      lengths: T per sample.
      batch_size: B; every batch but the last has exactly B samples.
      buckets: increasing bucket lengths (used to group samples when ``group_by_length``).
      shuffle: False keeps the file order (consecutive samples per batch, no grouping).
      seed, epoch: the permutation's generator is seeded with ``(seed, epoch)``.
      group_by_length: with ``shuffle``, batch samples of similar bucket together (see module docstring).

    Returns:
      ``ceil(len(lengths) / batch_size)`` int arrays of sample indices; every index appears exactly once.
    """
    n = len(lengths)
    if not shuffle:
        return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(n)
    if group_by_length:
        bucket_of = np.searchsorted(np.asarray(buckets), np.asarray(lengths), side="left")
        order = order[np.argsort(bucket_of[order], kind="stable")]
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    partial = [chunks.pop()] if chunks and len(chunks[-1]) < batch_size else []
    return [chunks[i] for i in rng.permutation(len(chunks))] + partial


def pad_left(rows: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int,
             length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Left-pads ``(input_ids [T], loss_mask [T])`` pairs into ``[B, L]`` arrays.

    Rows past ``len(rows)`` (up to ``batch_size``) are padding rows: id 0, all-False masks.

    Returns:
      ``input_ids`` int32 [B, L] (0 where padded), ``attention_mask`` bool [B, L], ``loss_mask`` bool [B, L],
      and each real row's offset ``L − T`` (the shift of its positions).

    Raises:
      ValueError: more rows than ``batch_size``, or a row longer than ``length``.
    """
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    input_ids = np.zeros((batch_size, length), np.int32)
    attention_mask = np.zeros((batch_size, length), bool)
    loss_mask = np.zeros((batch_size, length), bool)
    offsets = []
    for r, (ids, targets) in enumerate(rows):
        t = len(ids)
        if t > length or len(targets) != t:
            raise ValueError(f"row {r}: {t} ids and {len(targets)} mask entries for a row of length {length}")
        offset = length - t
        input_ids[r, offset:] = ids
        attention_mask[r, offset:] = True
        loss_mask[r, offset:] = targets
        offsets.append(offset)
    return input_ids, attention_mask, loss_mask, offsets


class FinetuneDataset:
    """Validated, tokenised samples of a data file, and their batches (the batch contract of issue 7).

    A batch is a dict of host values, every row padded to one bucket length L:
    ``input_ids`` int32 [B, L] (left-padded with 0), ``attention_mask`` bool [B, L], ``loss_mask`` bool
    [B, L] (True where ``input_ids[b, t]`` is a target, predicted from the logits at t − 1; never at t = 0),
    ``image_bound`` (per row int32 [n, 2] in padded positions), ``pixel_values`` (per row, float32 [3, h, w]
    pieces), ``tgt_sizes`` (per row int32 [n, 2]), ``image_sizes`` (per row, (W, H) per image) — the
    processor's meaning, so ``model.compute_logits(batch)`` takes it — and ``sample_ids`` (str per row).
    Padding rows have all-False masks, no images and sample id ``""``.

    Attributes:
      samples: the good samples in file order; ``bad``: those left out.
      lengths: int [N], T per sample.
    """

    def __init__(self, samples: Sequence[EncodedSample], processor: MiniCPMVProcessor, config: DataConfig,
                 bad: Sequence[BadSample] = (), workers: int | None = None) -> None:
        if not samples:
            raise SampleError("the dataset has no usable sample", bad)
        self.samples = list(samples)
        self.processor = processor
        self.config = config
        self.bad = list(bad)
        self.workers = check_workers(workers)
        self.lengths = np.asarray([len(s) for s in self.samples], np.int64)

    @classmethod
    def from_file(cls, path: str | os.PathLike, processor: MiniCPMVProcessor, config: DataConfig = DataConfig(),
                  *, workers: int | None = None) -> "FinetuneDataset":
        """Loads, validates and tokenises every sample of ``path`` (:mod:`minicpmv_jax.finetune.data`).

        ``workers`` threads validate samples and make each batch's image pieces (None: one per CPU, at most
        8); results do not depend on it.

        Raises:
          SampleError: bad samples with ``on_bad="error"`` (all of them listed), or no usable sample.
          FileNotFoundError / ValueError: the file itself cannot be read (see ``load_samples``).
        """
        return cls.from_samples(load_samples(path), processor, config, source=os.fspath(path), workers=workers)

    @classmethod
    def from_samples(cls, raw: Sequence[RawSample], processor: MiniCPMVProcessor, config: DataConfig = DataConfig(),
                     source: str = "fine-tuning data", *, workers: int | None = None) -> "FinetuneDataset":
        """:meth:`from_file` for samples already read (``source`` names them in messages)."""
        workers = check_workers(workers)
        samples, bad = encode_samples(raw, processor, config, source, workers)
        return cls(samples, processor, config, bad, workers)

    def __len__(self) -> int:
        return len(self.samples)

    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one possibly partial."""
        return -(-len(self.samples) // self.config.batch_size)

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """Sample indices of each batch of ``epoch`` (see :func:`epoch_batches`)."""
        cfg = self.config
        return epoch_batches(self.lengths, cfg.batch_size, buckets=cfg.bucket_lengths, shuffle=cfg.shuffle,
                             seed=cfg.seed, epoch=epoch, group_by_length=cfg.group_by_length)

    def batches(self, *, epoch: int = 0, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from step ``start_step`` on: exactly what the uninterrupted epoch yields
        from that step (earlier batches are not built)."""
        for name, value in (("epoch", epoch), ("start_step", start_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for indices in self.epoch_plan(epoch)[start_step:]:
            yield self.collate(indices)

    def stream(self, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Batches over all epochs without end, from global step ``start_step`` on (global step s is step
        ``s % steps_per_epoch()`` of epoch ``s // steps_per_epoch()``)."""
        epoch, step = divmod(start_step, self.steps_per_epoch())
        while True:
            yield from self.batches(epoch=epoch, start_step=step)
            epoch, step = epoch + 1, 0

    def collate(self, indices: Sequence[int]) -> dict[str, Any]:
        """The batch of samples ``indices`` (at most ``batch_size``), padded to their bucket."""
        cfg = self.config
        rows = [self.samples[i] for i in indices]
        length = bucket_length(max(len(r) for r in rows), cfg.bucket_lengths)
        input_ids, attention_mask, loss_mask, offsets = pad_left(
            [(r.input_ids, r.loss_mask) for r in rows], cfg.batch_size, length)
        pad = cfg.batch_size - len(rows)
        pixel_values, tgt_sizes = map(list, zip(*parallel_map(self._pixels, rows, self.workers)))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "image_bound": [r.image_bound + o for r, o in zip(rows, offsets)] + [np.zeros((0, 2), np.int32)] * pad,
            "pixel_values": pixel_values + [[] for _ in range(pad)],
            "tgt_sizes": tgt_sizes + [np.zeros((0, 2), np.int32)] * pad,
            "image_sizes": [list(r.image_sizes) for r in rows] + [[] for _ in range(pad)],
            "sample_ids": [r.sample_id for r in rows] + [""] * pad,
        }

    def _pixels(self, sample: EncodedSample) -> tuple[list[np.ndarray], np.ndarray]:
        """The sample's image pieces and tgt_sizes, made by the processor; they must match what validation
        measured (the files may have changed since)."""
        if not sample.images:
            return [], np.zeros((0, 2), np.int32)
        _, pieces, tgt_sizes, sizes = self.processor.expand_images(
            IMAGE_TAG * len(sample.images), list(sample.images), *self.config.slicing(self.processor))
        if [tuple(s) for s in sizes] != list(sample.image_sizes) or len(pieces) != len(sample.image_bound):
            raise SampleError(f"sample {sample.sample_id!r}: its images {list(sample.images)} changed since the "
                              f"dataset was loaded (sizes {list(sample.image_sizes)} then, {sizes} now)")
        return pieces, tgt_sizes
