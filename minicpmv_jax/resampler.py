"""Perceiver resampler: 64 learned queries cross-attend to one piece's encoder outputs (docs/model.md §4).

Per piece: ``kv = LN_kv(x @ kv_proj)``; keys ``kv + pos`` with a 2-D sine-cosine table of the piece's grid,
values ``kv``; queries ``LN_q(query)``; ``D/128``-head attention over the piece's real patches; out
projection; ``LN_post(·) @ proj``. Pieces come padded as the encoder batch (real patches first, row-major),
so a piece's grid size ``tgt_sizes [B, 2]`` is all the resampler needs: it derives each patch's row,
column and validity inside jit, and any grid size runs without recompiling.

Shape letters as in ``layers.py``; here D is the language model width, E the vision (encoder) width,
N/H the resampler heads / head dim (128).

Checkpoint names and transforms: :mod:`minicpmv_jax.checkpoint_names` (tower ``resampler``).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.attention import Mask, attention
from minicpmv_jax.config import ResamplerConfig
from minicpmv_jax.layers import Einsum, LayerNorm, fan_in_normal, normal, param, per_piece_on_cpu

__all__ = [
    "sincos_2d",
    "grid_coords",
    "Resampler",
]


# ---------------------------------------------------------------------------------------------- maths


def sincos_2d(rows: jax.Array, cols: jax.Array, dim: int) -> jax.Array:
    """2-D sine-cosine position embedding, float32 ``[..., dim]`` for integer ``rows``/``cols`` ``[...]``.

    The first ``dim/2`` channels encode the column, the last ``dim/2`` the row; each half is
    ``[sin(p·ω), cos(p·ω)]`` with ``ω_i = 10000^(−i/(dim/4))``, i = 0 … dim/4 − 1.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)

    def half(p: jax.Array) -> jax.Array:
        angle = p.astype(jnp.float32)[..., None] * omega
        return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)

    return jnp.concatenate([half(cols), half(rows)], axis=-1)


def grid_coords(tgt_sizes: jax.Array, num_patches: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row, column and validity ``[B, P]`` of each patch slot of pieces with grids ``tgt_sizes [B, 2]``.

    Slot p of piece b is patch ``(p // W_b, p % W_b)`` when ``p < H_b · W_b`` and padding otherwise.
    """
    p = jnp.arange(num_patches, dtype=jnp.int32)[None, :]
    height = tgt_sizes[:, 0:1].astype(jnp.int32)
    width = tgt_sizes[:, 1:2].astype(jnp.int32)
    safe_width = jnp.maximum(width, 1)  # an empty padding piece has size 0×0
    return p // safe_width, p % safe_width, p < height * width


# --------------------------------------------------------------------------------------------- module


class Resampler(nnx.Module):
    """One cross-attention layer from ``num_queries`` learned queries to a piece's patches."""

    def __init__(self, cfg: ResamplerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        self.config = cfg
        self.dtype = dtype
        self.scale = h ** -0.5
        self.query = param(rngs, normal, (cfg.num_queries, d), ("resampler_queries", "embed"), param_dtype)
        self.kv_proj = Einsum("BPE,ED->BPD", (cfg.kv_dim, d), ("vision_embed", "embed"),
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_axes = ("embed", "resampler_heads", "head_dim")
        in_kw = dict(bias_shape=(n, h), bias_axes=("resampler_heads", "head_dim"),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Einsum("QD,DNH->QNH", (d, n, h), in_axes, **in_kw)
        self.k = Einsum("BPD,DNH->BPNH", (d, n, h), in_axes, **in_kw)
        self.v = Einsum("BPD,DNH->BPNH", (d, n, h), in_axes, **in_kw)
        self.o = Einsum("BQNH,NHD->BQD", (n, h, d), ("resampler_heads", "head_dim", "embed"),
                        bias_shape=(d,), bias_axes=("embed",), fan_in=(0, 1),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(axis="embed", param_dtype=param_dtype, rngs=rngs)
        self.ln_q = LayerNorm(d, cfg.layer_norm_eps, **norm_kw)
        self.ln_kv = LayerNorm(d, cfg.layer_norm_eps, **norm_kw)
        self.ln_post = LayerNorm(d, cfg.layer_norm_eps, **norm_kw)
        self.proj = param(rngs, fan_in_normal((0,)), (d, d), ("embed", "resampler_proj"), param_dtype)

    def __call__(self, x: jax.Array, tgt_sizes: jax.Array) -> jax.Array:
        """``x [B, P, E]`` encoder outputs, ``tgt_sizes [B, 2]`` int grid (rows, cols) → ``[B, Q, D]``.

        The queries are projected once; pieces then run one at a time on CPU (:func:`per_piece_on_cpu`).
        """
        q = self.q(self.ln_q(self.query[...].astype(self.dtype)))               # [Q, N, H]
        return per_piece_on_cpu(lambda x, t: self._pieces(q, x, t), x, tgt_sizes)

    def _pieces(self, q: jax.Array, x: jax.Array, tgt_sizes: jax.Array) -> jax.Array:
        batch, num_patches, _ = x.shape
        rows, cols, valid = grid_coords(tgt_sizes, num_patches)
        kv = self.ln_kv(self.kv_proj(x))                                        # [B, P, D]
        pos = sincos_2d(rows, cols, self.config.embed_dim).astype(kv.dtype)     # [B, P, D]
        q = jnp.broadcast_to(q[None], (batch, *q.shape))                        # [B, Q, N, H]
        out = attention(q, self.k(kv + pos), self.v(kv), Mask(valid), scale=self.scale, loop_heads_on_cpu=True)
        out = self.ln_post(self.o(out))                                         # [B, Q, D]
        return out @ self.proj[...].astype(self.dtype)                          # x @ proj, not transposed
