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

Shape letters as in ``minicpmv_jax/layers.py``: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_losses", "loss_sums", "mean_loss"]


def token_losses(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """−log p(input_ids[:, t] | logits[:, t − 1]) for t ≥ 1, float32 ``[B, T − 1]``.

    ``logits`` ``[B, T, V]`` (any float dtype; computed in float32), ``input_ids`` int ``[B, T]``.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T], got {logits.shape} and {input_ids.shape}")
    logits = logits[:, :-1].astype(jnp.float32)                                   # [B, T-1, V]
    targets = input_ids[:, 1:].astype(jnp.int32)                                   # [B, T-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)                                      # [B, T-1]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]      # [B, T-1]
    return log_z - picked


def loss_sums(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the target tokens' losses float32, number of target tokens int32) of one batch.

    ``loss_mask`` bool ``[B, T]``: True where token t is a target (column 0 is ignored).
    """
    if loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask {loss_mask.shape} must have input_ids' shape {input_ids.shape}")
    weights = loss_mask[:, 1:].astype(bool)
    losses = token_losses(logits, input_ids)
    total = jnp.sum(jnp.where(weights, losses, 0.0))
    return total, jnp.sum(weights, dtype=jnp.int32)


def mean_loss(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count``, 0 when there is no target token."""
    return total / jnp.maximum(count, 1).astype(total.dtype)
