"""SigLIP vision encoder with variable-resolution position ids (docs/model.md §3).

Input is a batch of pieces padded to a common patch count (see ``patches.pack_pieces``): ``patches [B, P, C]``,
``pos_ids [B, P]`` (exact ids from ``position_buckets``) and ``valid [B, P]``. Padded patches are masked as
attention keys; their own outputs are garbage and must never be read.

Shape letters as in ``layers.py``; in this file D is the vision width, N/H the vision heads / head dim and
F the vision MLP width.

Checkpoint names and transforms: :mod:`minicpmv_jax.checkpoint_names` (tower ``vpm``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from minicpmv_jax.config import MiniCPMVConfig, VisionConfig
from minicpmv_jax.layers import Einsum, LayerNorm, normal, param

__all__ = [
    "masked_attention",
    "per_piece_on_cpu",
    "gelu_tanh",
    "VisionAttention",
    "VisionMlp",
    "VisionLayer",
    "VisionEncoder",
]

# Logit of a masked key. Finite so that a row whose keys are all masked (an empty padding piece) gives a
# uniform softmax instead of NaN.
_MASKED_LOGIT = -1e30


# ---------------------------------------------------------------------------------------------- maths


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None,
                     scale: float) -> jax.Array:
    """Softmax attention, logits and softmax in float32.

    ``q [B, T, N, H]``, ``k, v [B, S, N, H]``, ``key_valid [B, S]`` bool (None: all keys valid)
    → ``[B, T, N, H]`` in v's dtype.

    The maths is :func:`_attend` for every (piece, head). How it is scheduled depends on the platform
    (chosen at lowering): on CPU one (piece, head) at a time, so the ``[T, S]`` logits of one head (4 MB
    for a 1024-patch piece) stay in cache through the softmax and the second product; materialising all
    of them (``[B, N, T, S]``, 671 MB for 10 pieces) made attention 2–3× slower there
    (``benchmarks/vision_cpu.py``). Elsewhere all heads of all pieces in one batched product.
    """
    return jax.lax.platform_dependent(q, k, v, key_valid, cpu=functools.partial(_attention_per_head, scale=scale),
                                      default=functools.partial(_attention_batched, scale=scale))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, scale: float) -> jax.Array:
    """One head of one piece: ``q [T, H]``, ``k, v [S, H]``, ``key_valid [S]`` or None → ``[T, H]``."""
    logits = jnp.einsum("TH,SH->TS", q, k, preferred_element_type=jnp.float32) * scale
    if key_valid is not None:
        logits = jnp.where(key_valid[None, :], logits, _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("TS,SH->TH", probs, v)


def _attention_batched(q, k, v, key_valid, scale):
    """All (piece, head) pairs in one batched product: ``_attend`` vmapped over N, then B."""
    per_head = jax.vmap(_attend, in_axes=(1, 1, 1, None, None), out_axes=1)              # over N
    return jax.vmap(per_head, in_axes=(0, 0, 0, None if key_valid is None else 0, None))(
        q, k, v, key_valid, scale)                                                        # over B


def _attention_per_head(q, k, v, key_valid, scale):
    """One (piece, head) pair per step of a loop over the B·N pairs."""
    b, _, n, _ = q.shape

    def heads(x):  # q [B, T, N, H] → [B·N, T, H]; k, v the same with S for T
        return rearrange(x, "B T N H -> (B N) T H")

    valid = None if key_valid is None else jnp.repeat(key_valid, n, axis=0)              # [B·N, S]
    out = jax.lax.map(lambda a: _attend(*a, scale), (heads(q), heads(k), heads(v), valid))
    return rearrange(out, "(B N) T H -> B T N H", B=b)


def per_piece_on_cpu(fn, *args):
    """``fn(*args)`` for a batch of pieces: every leaf of ``args`` and of the result has the piece axis first.

    On CPU the pieces go through ``fn`` one per loop step (``fn`` sees a batch of one), so each piece's
    activations (5–18 MB for a 1024-patch piece at the SigLIP-so400m width, against 47–176 MB for a batch
    of 10) stay in cache between the products; this measured ≈ 20 % less CPU time per piece than the
    batched call (``benchmarks/vision_cpu.py``). Elsewhere one batched call. Chosen at lowering.
    """
    def loop(*xs):
        one = lambda a: jax.tree.map(lambda y: y[0], fn(*jax.tree.map(lambda y: y[None], a)))  # noqa: E731
        return jax.lax.map(one, xs)

    return jax.lax.platform_dependent(*args, cpu=loop, default=fn)


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
        out = masked_attention(self.q(x), self.k(x), self.v(x), valid, self.scale)
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
