"""Helpers shared by several test files: inputs (images, numbered video clips, hand-built fine-tuning
batches), loading one tower from reference tensors, and small reference computations.

The rule: a helper used by more than one test file lives here (or, for the PyTorch references, in
``reference.py`` / ``torch_*.py``), never in a ``test_*.py`` — no test file imports another
(``test_namespace.py`` checks it).
"""

from __future__ import annotations

import fractions
import pathlib

import numpy as np
from flax import nnx
from PIL import Image

from minicpmv_jax import checkpoint_names as names
from minicpmv_jax import config as C
from minicpmv_jax.config import MiniCPMVConfig

# --------------------------------------------------------------------------------------------------
# Images


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    """A random RGB image with smooth structure plus noise (not a flat colour)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * (3 + c) + yy * (5 - c)) % 256 for c in range(3)], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def random_image(rng: np.random.Generator, height: int, width: int, patch_size: int = 14) -> np.ndarray:
    """A normalised float32 image [3, h, w] of a ``height × width`` patch grid, values in [-1, 1]."""
    return rng.uniform(-1, 1, (3, height * patch_size, width * patch_size)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Numbered video clips: every frame carries its own number as a 4x3 grid of 16x16 black or white blocks
# (12 bits, one per block, aligned to the codec's macroblocks), which survives lossy compression, so a
# test can tell exactly WHICH frames came back.

CLIP_WIDTH, CLIP_HEIGHT, CLIP_BLOCK = 64, 48, 16
_COLS, _ROWS = CLIP_WIDTH // CLIP_BLOCK, CLIP_HEIGHT // CLIP_BLOCK  # 4 x 3 = 12 bits: frame numbers up to 4095


def frame_pixels(number: int) -> np.ndarray:
    """The uint8 RGB frame [H, W, 3] that shows ``number``."""
    img = np.zeros((CLIP_HEIGHT, CLIP_WIDTH, 3), np.uint8)
    for bit in range(_COLS * _ROWS):
        if number >> bit & 1:
            r, c = divmod(bit, _COLS)
            img[r * CLIP_BLOCK:(r + 1) * CLIP_BLOCK, c * CLIP_BLOCK:(c + 1) * CLIP_BLOCK] = 255
    return img


def frame_number(img: Image.Image) -> int:
    """The number a decoded frame shows (each block's centre must be clearly black or white)."""
    assert img.mode == "RGB" and img.size == (CLIP_WIDTH, CLIP_HEIGHT)
    px = np.asarray(img, dtype=np.float32)
    number = 0
    for bit in range(_COLS * _ROWS):
        r, c = divmod(bit, _COLS)
        block = px[r * CLIP_BLOCK + 4:(r + 1) * CLIP_BLOCK - 4, c * CLIP_BLOCK + 4:(c + 1) * CLIP_BLOCK - 4]
        mean = float(block.mean())
        assert mean < 64 or mean > 192, f"block {bit} is ambiguous ({mean:.0f}); compression too lossy?"
        number |= (mean > 128) << bit
    return number


def write_clip(path, num_frames, rate, *, options=None, container_options=None, audio_seconds=None):
    """An mpeg4 clip of ``num_frames`` numbered frames at ``rate`` fps (plus optional mp2 audio)."""
    import av

    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream("mpeg4", rate=fractions.Fraction(rate), options=options or {})
        stream.width, stream.height, stream.pix_fmt = CLIP_WIDTH, CLIP_HEIGHT, "yuv420p"
        stream.bit_rate = 2_000_000
        audio = None
        if audio_seconds:
            audio = out.add_stream("mp2", rate=48000, layout="mono")
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if audio is not None:
            total = int(audio_seconds * 48000)
            for start in range(0, total, 1152):
                samples = np.zeros((1, min(1152, total - start)), np.int16)
                aframe = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
                aframe.sample_rate, aframe.pts = 48000, start
                out.mux(audio.encode(aframe))
            out.mux(audio.encode())
    return pathlib.Path(path)


# --------------------------------------------------------------------------------------------------
# Reference computations


def prompt_ignore_length(attention_mask) -> np.ndarray:
    """transformers' ``prompt_ignore_length`` for a left-padded ``attention_mask [B, L]``, int32 ``[B]``:
    each row's first real slot, ``argmax(mask != 0)`` as ``_get_logits_processor`` computes it. Passed as
    ``sampling.update_seen``'s ``start``, it reproduces HF's penalty with ``inputs_embeds``."""
    return np.argmax(np.asarray(attention_mask) != 0, axis=-1).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# One tower from reference tensors (vision / resampler tests)


def load_tower(module: nnx.Module, cfg: MiniCPMVConfig, tower: str, tensors: dict) -> nnx.Module:
    """Fills a bare tower module from reference tensors (names of DESIGN §2 without the tower prefix)
    through the project's single name table; returns the filled module."""
    full = {f"{tower}.{k}": np.asarray(v) for k, v in tensors.items()}
    return names.load_entries(module, full.__getitem__, names.entries(cfg, (tower,)), strip=1)


# One jitted call for every module and input shape (the module is split into graphdef + state by nnx.jit).
jit_apply = nnx.jit(lambda module, *args: module(*args))


# --------------------------------------------------------------------------------------------------
# Fine-tuning: a small random config and hand-built batches that follow the fine-tuning batch contract
# (left-padded ids, attention and loss masks, the processor's image keys).
#
# The model is ``config.tiny`` with a 512-token vocabulary, 2 decoder layers and 1 running vision layer:
# the train step then compiles in seconds. Batches need no tokenizer: ids are random, an image's 64
# placeholder positions are given by ``image_bound`` exactly as the processor would.

FINETUNE_VOCAB = 512


def train_config():
    return C.tiny(vocab_size=FINETUNE_VOCAB, num_layers=2, vision_layers=2)


def make_batch(rng: np.random.Generator, rows: list[dict], length: int, num_rows: int | None = None,
               num_queries: int = 64) -> dict:
    """A host batch of the fine-tuning contract.

    ``rows``: per real row ``{"tokens": T, "image": (grid rows, grid cols) or None, "image_at": offset of
    the span inside the row's tokens}``. Each row is left-padded to ``length``; targets are the tokens
    after the image span (or after the first quarter), never the span itself. ``num_rows`` adds padding
    rows (all-False masks, no images).
    """
    b = len(rows) if num_rows is None else num_rows
    ids = np.zeros((b, length), np.int32)
    attention = np.zeros((b, length), bool)
    targets = np.zeros((b, length), bool)
    bounds, pixels, tgt_sizes, sizes = [], [], [], []
    for r in range(b):
        spec = rows[r] if r < len(rows) else None
        if spec is None:
            bounds.append(np.zeros((0, 2), np.int32))
            pixels.append([])
            tgt_sizes.append(np.zeros((0, 2), np.int32))
            sizes.append([])
            continue
        t = spec["tokens"]
        start = length - t
        ids[r, start:] = rng.integers(1, FINETUNE_VOCAB, t)
        attention[r, start:] = True
        first_target = start + t // 4
        if spec.get("image") is not None:
            span = start + spec.get("image_at", 2)
            bounds.append(np.array([[span, span + num_queries]], np.int32))
            gh, gw = spec["image"]
            pixels.append([random_image(rng, gh, gw)])
            tgt_sizes.append(np.array([[gh, gw]], np.int32))
            sizes.append([(gw * 14, gh * 14)])
            first_target = span + num_queries + 1
        else:
            bounds.append(np.zeros((0, 2), np.int32))
            pixels.append([])
            tgt_sizes.append(np.zeros((0, 2), np.int32))
            sizes.append([])
        targets[r, max(first_target, start + 1):] = rng.random(length - max(first_target, start + 1)) < 0.8
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": targets, "image_bound": bounds,
            "pixel_values": pixels, "tgt_sizes": tgt_sizes, "image_sizes": sizes,
            "sample_ids": [f"s{r}" if r < len(rows) else "" for r in range(b)]}


def text_batch(seed: int, num_rows: int, length: int, lengths: list[int] | None = None) -> dict:
    """Text-only rows of the given token counts (default: all ``length``)."""
    rng = np.random.default_rng(seed)
    lengths = lengths or [length] * num_rows
    return make_batch(rng, [{"tokens": t} for t in lengths], length, num_rows=num_rows)


def split_rows(batch: dict, parts: int) -> list[dict]:
    """The rows of ``batch`` cut into ``parts`` consecutive micro-batches (same length)."""
    b = batch["input_ids"].shape[0]
    step = b // parts
    out = []
    for i in range(parts):
        sl = slice(i * step, (i + 1) * step)
        out.append({k: v[sl] for k, v in batch.items()})
    return out


def assert_same_update(before: dict, after: dict, ref_before: dict, ref_after: dict, lr: float,
                       tol: float = 1e-5) -> None:
    """Updated parameters equal the reference's (relative ≤ ``tol``), and so do the updates themselves:
    ``max |Δ − Δ_ref| ≤ 1e-4 · max |Δ_ref| + 2 ulp(max |param|)`` — an update is read as the difference of
    two float32 parameters, so it is only known to their rounding.
    """
    from reference import rel_err  # torch-side module: imported only where needed

    assert after.keys() == ref_after.keys()
    ulp = float(np.finfo(np.float32).eps)
    for key, ref in ref_after.items():
        np.testing.assert_array_equal(before[key], ref_before[key])
        assert rel_err(after[key], ref) <= tol, key
        ours, theirs = after[key] - before[key], ref - ref_before[key]
        bound = 1e-4 * np.abs(theirs).max() + 2 * ulp * np.abs(ref).max()
        assert np.abs(ours - theirs).max() <= bound, (key, np.abs(ours - theirs).max(), bound)
