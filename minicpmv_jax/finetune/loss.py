"""The training loss: next-token cross-entropy on the target tokens, as a sum and a count.

``loss_mask[b, t]`` marks token t as a target, predicted from the logits at t − 1 (so column 0 is never
a target). The loss of a step is

    sum over every target token of the WHOLE step (all micro-batches) of −log p(token)
    ──────────────────────────────────────────────────────────────────────────────────
                     number of target tokens of the whole step

which is why the functions here return the numerator and the denominator separately: gradient
accumulation adds them up over micro-batches and divides once (:func:`mean_loss`), which gives exactly
the gradient of one big batch. Rows without targets (padding rows: all-False masks) contribute zero to
both, and an all-empty step gives loss 0, never NaN.

**Chunked loss.** The full-vocabulary float32 logits ``[B, T, V]`` are the largest activation of a train
step (MiniCPM-V's V = 151 666: 0.62 GB per row of 1024 tokens, and the backward keeps them or their softmax).
:func:`hidden_loss_sums` starts from the final hidden states instead and, given a ``chunk``, scans over
sequence chunks of ``C`` positions: each computes ``lm_head`` and the log-sum-exp of its ``[B, C, V]``
logits under ``jax.checkpoint``, so the forward keeps no logits and the backward recomputes one chunk's at
a time (one more ``lm_head`` product per token: ~2·D·V FLOPs). Chunks cut the sequence axis only, so a
batch split over devices stays split.

Shape letters as in ``minicpmv_jax/layers.py``: B batch, T length, D model width, V vocabulary; C chunk.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["token_losses", "loss_sums", "hidden_loss_sums", "mean_loss"]


def token_losses(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """−log p(input_ids[:, t] | logits[:, t − 1]) for t ≥ 1, float32 ``[B, T − 1]``.

    ``logits`` ``[B, T, V]`` (any float dtype; computed in float32), ``input_ids`` int ``[B, T]``.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T], got {logits.shape} and {input_ids.shape}")
    return _losses(logits[:, :-1], input_ids[:, 1:])


def _losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``logsumexp(logits) − logits[target]`` in float32: logits ``[B, T, V]``, targets int ``[B, T]``."""
    logits = logits.astype(jnp.float32)                                            # [B, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)                                      # [B, T]
    picked = jnp.take_along_axis(logits, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]   # [B, T]
    return log_z - picked


def _check_mask(loss_mask: jax.Array, input_ids: jax.Array) -> None:
    if loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask {loss_mask.shape} must have input_ids' shape {input_ids.shape}")


def loss_sums(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the target tokens' losses float32, number of target tokens int32) of one batch.

    ``loss_mask`` bool ``[B, T]``: True where token t is a target (column 0 is ignored).
    """
    _check_mask(loss_mask, input_ids)
    weights = loss_mask[:, 1:].astype(bool)
    losses = token_losses(logits, input_ids)
    total = jnp.sum(jnp.where(weights, losses, 0.0))
    return total, jnp.sum(weights, dtype=jnp.int32)


def hidden_loss_sums(hidden: jax.Array, lm_head: Callable[[jax.Array], jax.Array], input_ids: jax.Array,
                     loss_mask: jax.Array, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`loss_sums` of ``lm_head(hidden)``, optionally without materialising the whole logits.

    Args:
      hidden: the final hidden states ``[B, T, D]`` (``MiniCPMV.hidden_states``).
      lm_head: ``[B, C, D]`` → logits ``[B, C, V]`` (any float dtype; the loss is float32), e.g.
        ``model.llm.logits``. It is called once per chunk, so it must not draw random numbers.
      input_ids, loss_mask: int / bool ``[B, T]`` as in :func:`loss_sums`.
      chunk: sequence positions per chunk (C); None, or a chunk that covers the sequence, computes the
        full logits at once, exactly as :func:`loss_sums` does.

    Returns:
      ``(loss sum float32, target-token count int32)``; the sum equals :func:`loss_sums`' up to the order
      of float32 additions, and so do its gradients.
    """
    _check_mask(loss_mask, input_ids)
    if hidden.ndim != 3 or hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden must be [B, T, D] with input_ids' [B, T] = {input_ids.shape}, got {hidden.shape}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    b, t, d = hidden.shape
    if chunk is None or chunk >= t - 1:
        return loss_sums(lm_head(hidden), input_ids, loss_mask)
    # Position t predicts token t + 1: the last position predicts nothing (weight 0), so the hidden
    # states are used unshifted and the targets shifted left by one.
    targets = jnp.pad(input_ids[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))           # [B, T]
    weights = jnp.pad(loss_mask[:, 1:].astype(bool), ((0, 0), (0, 1)))                # [B, T]
    n = -(-t // chunk)
    size = -(-t // n)                                  # n balanced chunks of ≤ C positions
    pad = n * size - t

    def chunks(x: jax.Array) -> jax.Array:             # [B, T, ...] → [n, B, size, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sum(h: jax.Array, tgt: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(w, _losses(lm_head(h), tgt), 0.0))                   # [B, size, V] inside

    def body(total, xs):
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(weights)))
    return total, jnp.sum(weights, dtype=jnp.int32)


def mean_loss(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count``, 0 when there is no target token."""
    return total / jnp.maximum(count, 1).astype(total.dtype)
