"""SigLIP vision encoder with variable-resolution position ids (docs/model.md §3).

Input is a batch of pieces padded to a common patch count (see ``patches.pack_pieces``): ``patches [B, P, C]``,
``pos_ids [B, P]`` (exact ids from ``position_buckets``) and ``valid [B, P]``. Padded patches are masked as
attention keys; their own outputs are garbage and must never be read.

Shape letters as in ``layers.py``; in this file D is the vision width, N/H the vision heads / head dim and
F the vision MLP width.

Checkpoint names and transforms: :mod:`minicpmv_jax.checkpoint_names` (tower ``vpm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax.attention import Mask, attention
from minicpmv_jax.config import MiniCPMVConfig, VisionConfig
from minicpmv_jax.layers import Einsum, LayerNorm, normal, param, per_piece_on_cpu

__all__ = [
    "gelu_tanh",
    "VisionAttention",
    "VisionMlp",
    "VisionLayer",
    "VisionEncoder",
]


# ---------------------------------------------------------------------------------------------- maths


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch ``gelu(approximate="tanh")``), evaluated in float32."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


# -------------------------------------------------------------------------------------------- modules


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/o projections."""

    def __init__(self, dim: int, num_heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        in_kw = dict(bias_shape=(num_heads, head_dim), bias_axes=("vision_heads", "vision_head_dim"),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_axes = ("vision_embed", "vision_heads", "vision_head_dim")
        self.q = Einsum("BPD,DNH->BPNH", (dim, num_heads, head_dim), in_axes, **in_kw)
        self.k = Einsum("BPD,DNH->BPNH", (dim, num_heads, head_dim), in_axes, **in_kw)
        self.v = Einsum("BPD,DNH->BPNH", (dim, num_heads, head_dim), in_axes, **in_kw)
        self.o = Einsum("BPNH,NHD->BPD", (num_heads, head_dim, dim),
                        ("vision_heads", "vision_head_dim", "vision_embed"),
                        bias_shape=(dim,), bias_axes=("vision_embed",), fan_in=(0, 1),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        """``x [B, P, D]``, ``valid [B, P]`` (keys to attend to) → ``[B, P, D]``."""
        out = attention(self.q(x), self.k(x), self.v(x), Mask(valid), scale=self.scale, loop_heads_on_cpu=True)
        return self.o(out)


class VisionMlp(nnx.Module):
    """``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.fc1 = Einsum("BPD,DF->BPF", (dim, hidden), ("vision_embed", "vision_mlp"),
                          bias_shape=(hidden,), bias_axes=("vision_mlp",),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Einsum("BPF,FD->BPD", (hidden, dim), ("vision_mlp", "vision_embed"),
                          bias_shape=(dim,), bias_axes=("vision_embed",),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-norm encoder layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        norm_kw = dict(axis="vision_embed", param_dtype=param_dtype, rngs=rngs)
        self.ln1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm_kw)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_attention_heads, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
        self.ln2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm_kw)
        self.mlp = VisionMlp(cfg.hidden_size, cfg.intermediate_size, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln1(x), valid)
        return x + self.mlp(self.ln2(x))


class VisionEncoder(nnx.Module):
    """SigLIP: patch embedding + bucketed position table, ``num_layers`` encoder layers, final LayerNorm.

    ``cfg`` is a :class:`MiniCPMVConfig` (runs ``cfg.num_vision_layers`` layers) or a
    :class:`VisionConfig` (runs ``num_layers``, default all ``num_hidden_layers``).
    """

    def __init__(self, cfg: MiniCPMVConfig | VisionConfig, num_layers: int | None = None, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(cfg, MiniCPMVConfig):
            vcfg, default_layers = cfg.vision, cfg.num_vision_layers
        else:
            vcfg, default_layers = cfg, cfg.num_hidden_layers
        num_layers = default_layers if num_layers is None else num_layers
        if num_layers < 1:
            raise ValueError(f"the vision encoder needs at least one layer, got num_layers={num_layers}")
        d = vcfg.hidden_size
        self.config = vcfg
        self.dtype = dtype
        self.patch_embed = Einsum("BPC,CD->BPD", (vcfg.patch_dim, d), ("vision_patch", "vision_embed"),
                                  bias_shape=(d,), bias_axes=("vision_embed",),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = param(rngs, normal, (vcfg.num_positions, d), ("vision_pos", "vision_embed"),
                               param_dtype)
        self.layers = nnx.List([VisionLayer(vcfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(num_layers)])
        self.post_ln = LayerNorm(d, vcfg.layer_norm_eps, axis="vision_embed", param_dtype=param_dtype,
                                 rngs=rngs)

    def __call__(self, patches: jax.Array, pos_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """``patches [B, P, C]``, ``pos_ids [B, P]`` int, ``valid [B, P]`` bool → ``[B, P, D]`` in ``dtype``.

        Pieces are independent; on CPU they run one at a time (:func:`per_piece_on_cpu`).
        """
        return per_piece_on_cpu(self._encode, patches, pos_ids, valid)

    def _encode(self, patches: jax.Array, pos_ids: jax.Array, valid: jax.Array | None) -> jax.Array:
        x = self.patch_embed(patches)
        x = x + jnp.take(self.pos_embed[...], pos_ids, axis=0).astype(self.dtype)
        for layer in self.layers:
            x = layer(x, valid)
        return self.post_ln(x)
