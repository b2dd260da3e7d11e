"""Shared pieces of the fine-tuning tests: a small random checkpoint and hand-built batches that follow
the fine-tuning batch contract (left-padded ids, attention and loss masks, the processor's image keys).

The model is ``config.tiny`` with a 512-token vocabulary, 2 decoder layers and 1 running vision layer:
the train step then compiles in seconds. Batches need no tokenizer: ids are random, an image's 64
placeholder positions are given by ``image_bound`` exactly as the processor would.
"""

from __future__ import annotations

import numpy as np

from minicpmv_jax import config as C

VOCAB = 512


def train_config():
    return C.tiny(vocab_size=VOCAB, num_layers=2, vision_layers=2)


def random_piece(rng: np.random.Generator, rows: int, cols: int, patch: int = 14) -> np.ndarray:
    """A normalised image piece float32 [3, rows·14, cols·14] in [−1, 1]."""
    return rng.uniform(-1.0, 1.0, (3, rows * patch, cols * patch)).astype(np.float32)


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
        ids[r, start:] = rng.integers(1, VOCAB, t)
        attention[r, start:] = True
        first_target = start + t // 4
        if spec.get("image") is not None:
            span = start + spec.get("image_at", 2)
            bounds.append(np.array([[span, span + num_queries]], np.int32))
            gh, gw = spec["image"]
            pixels.append([random_piece(rng, gh, gw)])
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
    from reference import rel_err

    assert after.keys() == ref_after.keys()
    ulp = float(np.finfo(np.float32).eps)
    for key, ref in ref_after.items():
        np.testing.assert_array_equal(before[key], ref_before[key])
        assert rel_err(after[key], ref) <= tol, key
        ours, theirs = after[key] - before[key], ref - ref_before[key]
        bound = 1e-4 * np.abs(theirs).max() + 2 * ulp * np.abs(ref).max()
        assert np.abs(ours - theirs).max() <= bound, (key, np.abs(ours - theirs).max(), bound)
