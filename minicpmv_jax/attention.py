"""Scaled dot-product attention: the one core that all three towers call, and the masks it takes.

Shape letters: see :mod:`minicpmv_jax.layers`. A mask is bool, True where a query may attend to a key:
``[B, T, S]`` per query (the decoder's causal mask, :func:`causal_mask`) or ``[B, 1, S]`` for every query
alike (the encoders' key padding, :func:`key_mask`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

__all__ = [
    "MASK_VALUE",
    "causal_mask",
    "key_mask",
    "attention",
]

# Logit of a masked key: the default mask value of JAX's Pallas splash attention. Finite, so a query row
# whose keys are all masked (a left-padding position, an empty padding piece) gives a uniform softmax
# (finite, meaningless values) instead of NaN; -inf would give NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# ---------------------------------------------------------------------------------------------- masks


def causal_mask(key_valid: jax.Array, write_index: jax.Array, num_queries: int) -> jax.Array:
    """Causal mask ``[B, T, S]`` for ``T = num_queries`` queries written at slots ``[write_index,
    write_index + T)``: query t sees the slots s ≤ write_index + t that ``key_valid [B, S]`` marks real."""
    s = jnp.arange(key_valid.shape[-1])[None, :]
    q = jnp.asarray(write_index, jnp.int32) + jnp.arange(num_queries)[:, None]
    return (s <= q)[None] & key_valid[:, None, :].astype(bool)


def key_mask(key_valid: jax.Array | None) -> jax.Array | None:
    """Key padding ``key_valid [B, S]`` as a mask ``[B, 1, S]``: every query sees the valid keys.
    None (every key valid) stays None."""
    return None if key_valid is None else key_valid[:, None, :].astype(bool)


# ----------------------------------------------------------------------------------------------- core


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float | None = None,
              loop_heads_on_cpu: bool = False) -> jax.Array:
    """Grouped-query softmax attention, logits and softmax in float32.

    ``q [B, T, N, H]``, ``k, v [B, S, K, H]``, ``mask [B, T, S]`` or ``[B, 1, S]`` bool (True = may attend;
    None: every key) → ``[B, T, N, H]`` in v's dtype. ``N = K·G``: query head n uses K/V head n // G;
    ``K == N`` is plain multi-head attention. ``scale`` multiplies the logits (default ``H ** -0.5``).
    A query row with every key masked gives finite garbage (:data:`MASK_VALUE`).

    The queries are laid out ``[B, K, G, T, H]`` before the products (and the result comes back from
    ``[B, K, G, T, H]``), so that every product, forward and backward, runs on ``(G, T)`` as one row axis
    of the ``[B, K, G·T, S]`` logits: with the queries left ``[B, T, K, G, H]`` XLA transposed the
    logit-sized tensors (``[B, K, T, G, S]`` and ``[B, K, S, T, G]`` copies) in the backward pass and
    the probabilities in the forward instead of the query-sized ones (on CPU at ``benchmarks/train_cpu.py``'s
    shapes, 2 cores: forward + backward 22.5 → 17.5 ms, forward alone 12.4 → 7.3 ms).

    Schedule: by default every (batch row, K/V head) group in one batched product. With
    ``loop_heads_on_cpu`` (the vision encoder and the resampler) the platform decides at lowering: on CPU
    one group per step of a loop over the ``B·K`` groups, so the ``[G·T, S]`` logits of one group (4 MB
    for one head of a 1024-patch piece) stay in cache through the softmax and the second product;
    materialising all of them (``[B, N, T, S]``, 671 MB for 10 pieces) made attention 2–3× slower there
    (``benchmarks/vision_cpu.py``). Elsewhere the batched product.

    This is the seam for other implementations: a blockwise (flash) core for long sequences and the
    platform kernels (cuDNN, Pallas splash attention) will plug in here behind an ``implementation``
    switch, with the same shapes and mask.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not loop_heads_on_cpu:
        return _attention_batched(q, k, v, mask, scale)
    return jax.lax.platform_dependent(q, k, v, mask, cpu=functools.partial(_attention_per_group, scale=scale),
                                      default=functools.partial(_attention_batched, scale=scale))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
            logits_eq: str, out_eq: str) -> jax.Array:
    """The maths, for either schedule: ``logits_eq`` gives the q·k product, ``out_eq`` the product of the
    probabilities with v, and ``mask`` (or None) broadcasts against the logits."""
    logits = jnp.einsum(logits_eq, q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum(out_eq, probs, v)


def _attention_batched(q, k, v, mask, scale):
    """Every (batch row, K/V head) group in one batched product."""
    qg = rearrange(q, "B T (K G) H -> B K G T H", K=k.shape[2])
    mask = None if mask is None else mask[:, None, None, :, :]                         # [B, 1, 1, T|1, S]
    out = _attend(qg, k, v, mask, scale, "BKGTH,BSKH->BKGTS", "BKGTS,BSKH->BKGTH")
    return rearrange(out, "B K G T H -> B T (K G) H")


def _attention_per_group(q, k, v, mask, scale):
    """One (batch row, K/V head) group per step of a loop over the ``B·K`` groups. In a step the group's
    ``G·T`` query rows are one row axis and the products carry no batch axes (``"TH,SH->TS"`` with T
    standing for those rows): XLA:CPU then multiplies the operands as they lie, where unit batch axes
    made it transpose k in every step."""
    b, kv_heads = k.shape[0], k.shape[2]
    groups = q.shape[2] // kv_heads
    qs = rearrange(q, "B T (K G) H -> (B K) (G T) H", K=kv_heads)                        # [B·K, G·T, H]
    ks = rearrange(k, "B S K H -> (B K) S H")                                            # [B·K, S, H]
    vs = rearrange(v, "B S K H -> (B K) S H")
    masks = None
    if mask is not None:
        if mask.shape[1] > 1:
            mask = jnp.tile(mask, (1, groups, 1))                                        # [B, G·T, S]
        masks = jnp.repeat(mask, kv_heads, axis=0)                                       # [B·K, G·T|1, S]
    out = jax.lax.map(lambda a: _attend(*a, scale, "TH,SH->TS", "TS,SH->TH"),
                      (qs, ks, vs, masks))                                               # [B·K, G·T, H]
    return rearrange(out, "(B K) (G T) H -> B T (K G) H", B=b, G=groups)
