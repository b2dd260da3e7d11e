"""MiniCPM-V 2.6 processor: rendered prompts and their images to the model's batch (docs/model.md §6, §8).

:meth:`MiniCPMVProcessor.__call__` replaces each image tag ``(<image>./</image>)`` of a prompt by that
image's placeholder (:func:`minicpmv_jax.slicing.image_placeholder`), cuts and normalises the image
(:func:`minicpmv_jax.image_processing.preprocess_image`), tokenises, finds the placeholder spans
(:func:`image_bounds`), truncates and left-pads, and returns the batch dict of docs/model.md §8.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from minicpmv_jax import slicing
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.hub import resolve_model
from minicpmv_jax.image_processing import ImageError, preprocess_image
from minicpmv_jax.tokenizer import MiniCPMVTokenizer

__all__ = [
    "IMAGE_TAG",
    "PREPROCESSOR_CONFIG_FILE",
    "PreprocessorConfig",
    "MiniCPMVProcessor",
    "image_bounds",
    "left_pad",
]

#: The tag a chat message uses for an image (docs/model.md §6); each is replaced by the image's placeholder.
IMAGE_TAG = "(<image>./</image>)"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"

# preprocessor_config.json keys that spell out placeholder tokens → the PlaceholderTokens field they name.
# Only the standard strings (PlaceholderTokens' defaults) are supported.
_TOKEN_KEYS = {
    "im_start": "image_start",
    "im_end": "image_end",
    "slice_start": "slice_start",
    "slice_end": "slice_end",
    "unk": "unk",
    "im_id_start": "image_id_start",
    "im_id_end": "image_id_end",
}


@dataclasses.dataclass(frozen=True)
class PreprocessorConfig:
    """The image-preprocessing values of ``preprocessor_config.json`` (defaults: the released checkpoint).

    Attributes:
      max_slice_nums: N, the most slices an image is cut into (docs/model.md §6).
      scale_resolution: S, the side of the area each piece is fitted to.
      patch_size: P, the vision patch side; piece sides are multiples of it.
      use_image_id: whether each image's placeholder starts with ``<image_id>k</image_id>``.
      image_feature_size: placeholder ``<unk>`` tokens per piece (the resampler's query count).
      slice_mode: whether large images are sliced at all.
      norm_mean, norm_std: per-channel normalisation of pixels scaled to [0, 1].
    """

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    use_image_id: bool = True
    image_feature_size: int = 64
    slice_mode: bool = True
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG_FILE) -> "PreprocessorConfig":
        """Reads the known keys of ``cfg``; absent keys keep their defaults, other keys are ignored.

        Raises:
          ValueError: a known key of the wrong type or value, naming ``source`` and the key.
        """
        values: dict[str, Any] = {}
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            if cfg.get(name) is not None:
                value = cfg[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
                values[name] = value
        for name in ("use_image_id", "slice_mode"):
            if cfg.get(name) is not None:
                if not isinstance(cfg[name], bool):
                    raise ValueError(f"{source}: {name} must be true or false, got {cfg[name]!r}")
                values[name] = cfg[name]
        for name in ("norm_mean", "norm_std"):
            if cfg.get(name) is not None:
                value = cfg[name]
                ok = isinstance(value, (list, tuple)) and len(value) == 3
                ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                if not ok:
                    raise ValueError(f"{source}: {name} must be a list of 3 numbers, got {value!r}")
                values[name] = tuple(float(v) for v in value)
        if any(v == 0 for v in values.get("norm_std", ())):
            raise ValueError(f"{source}: norm_std must not contain 0, got {values['norm_std']}")
        for key, field in _TOKEN_KEYS.items():
            expected = getattr(slicing.PlaceholderTokens(), field)
            if cfg.get(key) is not None and cfg[key] != expected:
                raise ValueError(f"{source}: {key} is {cfg[key]!r}; only the standard {expected!r} is supported")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str) -> "PreprocessorConfig":
        """Reads ``path`` (a ``preprocessor_config.json``)."""
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
        return cls.from_dict(cfg, source=path)


def image_bounds(ids: Sequence[int] | np.ndarray, tokenizer: MiniCPMVTokenizer) -> np.ndarray:
    """Spans of the image placeholders in one prompt's ids (docs/model.md §6), int32 ``[n, 2]``.

    For every ``<image>`` or ``<slice>`` token at position p, the span ``[p + 1, q)`` up to the first
    ``</image>`` or ``</slice>`` at position q > p. Spans come in id order: per image the overview, then
    its slices row by row. A start token with no end after it (a prompt truncated inside a placeholder)
    gives no span. An end token met before any start, or a second start before the end of the first,
    is a malformed prompt and raises ``ValueError``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"image_bounds expects one prompt's ids (1-D), got shape {ids.shape}")
    starts = np.isin(ids, (tokenizer.image_start_id, tokenizer.slice_start_id))
    ends = np.isin(ids, (tokenizer.image_end_id, tokenizer.slice_end_id))
    marks = np.flatnonzero(starts | ends)
    bounds = []
    open_at = -1
    for pos in marks.tolist():
        if starts[pos]:
            if open_at >= 0:
                raise ValueError(f"image placeholder start at position {pos} inside the one opened at {open_at - 1}")
            open_at = pos + 1
        else:
            if open_at < 0:
                raise ValueError(f"image placeholder end at position {pos} without a start before it")
            bounds.append((open_at, pos))
            open_at = -1
    return np.asarray(bounds, dtype=np.int32).reshape(-1, 2)


class MiniCPMVProcessor:
    """Turns prompts (rendered chat text) and images into the model's batch (docs/model.md §8)."""

    def __init__(self, tokenizer: MiniCPMVTokenizer, config: PreprocessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config if config is not None else PreprocessorConfig()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MiniCPMVProcessor":
        """Loads the tokenizer from the checkpoint folder ``path`` and its ``preprocessor_config.json`` if
        present (defaults of :class:`PreprocessorConfig` otherwise).

        ``path`` is what :meth:`MiniCPMV.from_pretrained <minicpmv_jax.model.MiniCPMVModel.from_pretrained>`
        takes: a folder (``~`` expanded), ``"demo"`` or a Hub id."""
        path = resolve_model(path, weights=False)  # a Hub id: its config and tokenizer files only
        tokenizer = MiniCPMVTokenizer.from_pretrained(path)
        cfg_path = os.path.join(path, PREPROCESSOR_CONFIG_FILE)
        config = PreprocessorConfig.from_file(cfg_path) if os.path.isfile(cfg_path) else PreprocessorConfig()
        return cls(tokenizer, config)

    def expand_images(
        self, text: str, images: Sequence[Any], max_slice_nums: int, use_image_id: bool
    ) -> tuple[str, list[np.ndarray], np.ndarray, list[tuple[int, int]]]:
        """Replaces the k-th :data:`IMAGE_TAG` of ``text`` by the k-th image's placeholder (docs/model.md §6).

        Returns (text with placeholders, pixel_values per piece as float32 ``[3, h, w]`` — per image the
        overview, then its slices row by row —, tgt_sizes int32 ``[n_pieces, 2]``, ``(W, H)`` per image).

        Raises:
          ValueError: the number of tags differs from the number of images.
          ImageError: an image cannot be used (naming it and its position).
        """
        parts = text.split(IMAGE_TAG)
        if len(parts) - 1 != len(images):
            raise ValueError(
                f"the prompt has {len(parts) - 1} image tag(s) {IMAGE_TAG!r} but {len(images)} image(s) were "
                "given: each image needs exactly one tag, in order"
            )
        cfg = self.config
        pieces: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        originals: list[tuple[int, int]] = []
        out = [parts[0]]
        for k, image in enumerate(images):
            try:
                processed = preprocess_image(
                    image, max_slice_nums if cfg.slice_mode else 1, cfg.scale_resolution, cfg.patch_size,
                    mean=cfg.norm_mean, std=cfg.norm_std,
                )
            except ImageError as e:
                raise ImageError(f"image {k}: {e}") from None
            pieces.extend(processed.pixel_values)
            sizes.append(processed.tgt_sizes)
            originals.append(processed.image_size)
            out.append(slicing.image_placeholder(k, processed.grid, use_image_id, cfg.image_feature_size))
            out.append(parts[k + 1])
        tgt_sizes = np.concatenate(sizes).astype(np.int32) if sizes else np.zeros((0, 2), np.int32)
        return "".join(out), pieces, tgt_sizes, originals

    def __call__(
        self,
        texts: str | Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """Builds the batch for ``texts`` (docs/model.md §8).

        Args:
          texts: rendered prompts (one str is a batch of one).
          images: per text, a list of images (PIL images, paths or encoded bytes) for its
            ``(<image>./</image>)`` tags, in order; None or empty lists for text-only prompts. The number of
            images of a text must equal its number of tags.
          max_slice_nums, use_image_id: override the preprocessor config for this call.
          max_length: keep only the FIRST ``max_length`` tokens of each prompt (the end is cut, as in the
            reference's ``input_ids[:max_length]``). A placeholder cut by it loses its span in
            ``image_bound``; its pieces are still returned and the model uses only as many pieces as
            there are spans (the first ones).

        Returns:
          ``input_ids`` int32 [B, L] left-padded with 0; ``attention_mask`` bool [B, L]; ``image_bound``
          list of int32 [n_i, 2]; ``pixel_values`` list of lists of float32 [3, h, w]; ``tgt_sizes`` list of
          int32 [n_i, 2]; ``image_sizes`` list of lists of (W, H). For text-only prompts the image fields
          are empty and ``image_bound`` is [0, 2] (there are no pieces to place).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one prompt")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"images must hold one list per text: got {len(images)} lists for {len(texts)} texts")
        bad_length = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        if max_length is not None and bad_length:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        max_slice_nums = self.config.max_slice_nums if max_slice_nums is None else max_slice_nums
        use_image_id = self.config.use_image_id if use_image_id is None else use_image_id
        if isinstance(max_slice_nums, bool) or not isinstance(max_slice_nums, int) or max_slice_nums < 1:
            raise ArgumentError("{} must be a positive int or None, got {value!r}", "max_slice_nums",
                                value=max_slice_nums)
        if not isinstance(use_image_id, bool):
            raise ArgumentError("{} must be True, False or None, got {value!r}", "use_image_id", value=use_image_id)

        all_ids, bounds, pixel_values, tgt_sizes, image_sizes = [], [], [], [], []
        for i, text in enumerate(texts):
            text_images = list(images[i]) if images is not None and images[i] is not None else []
            has_images = bool(text_images) or IMAGE_TAG in text
            if has_images:
                try:
                    text, pieces, sizes, originals = self.expand_images(
                        text, text_images, max_slice_nums, use_image_id)
                except ValueError as e:  # ImageError included: say which text it belongs to
                    raise type(e)(f"texts[{i}]: {e}") from None
            else:
                pieces, sizes, originals = [], np.zeros((0, 2), np.int32), []
            ids = self.tokenizer.encode(text)
            if max_length is not None:
                ids = ids[:max_length]
            if not ids:
                raise ValueError(f"texts[{i}] encodes to no tokens")
            all_ids.append(ids)
            bounds.append(image_bounds(ids, self.tokenizer) if has_images else np.zeros((0, 2), np.int32))
            pixel_values.append(pieces)
            tgt_sizes.append(sizes)
            image_sizes.append(originals)

        input_ids, attention_mask = left_pad(all_ids)
        bounds = [b + (input_ids.shape[1] - len(ids)) for b, ids in zip(bounds, all_ids)]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_bound": bounds,
            "pixel_values": pixel_values,
            "tgt_sizes": tgt_sizes,
            "image_sizes": image_sizes,
        }


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads ``seqs`` to their longest length: int32 ids ``[B, L]`` and a bool mask (True = real token)."""
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = True
    return ids, mask
