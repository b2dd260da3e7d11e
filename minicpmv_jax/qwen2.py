"""The Qwen2 decoder (docs/model.md §5) as thin NNX parameter holders around pure functions.

Shape letters: see :mod:`minicpmv_jax.layers`. One call runs T new positions against S cache slots;
a full forward without a cache is the case S = T, write index 0.

Parameter layout (the checkpoint transforms live in :mod:`minicpmv_jax.checkpoint_names`):

    embed_tokens.embedding  [V, D]     ('vocab', 'embed')
    layers[i].attn.q        [D, N, H]  ('embed', 'heads', 'head_dim')      + bias [N, H]
    layers[i].attn.k / v    [D, K, H]  ('embed', 'kv_heads', 'head_dim')   + bias [K, H]
    layers[i].attn.o        [N, H, D]  ('heads', 'head_dim', 'embed')
    layers[i].mlp.gate / up [D, F]     ('embed', 'mlp');  mlp.down [F, D] ('mlp', 'embed')
    layers[i].input_norm / post_attn_norm / norm  [D]  ('norm',)
    lm_head                 [D, V]     ('embed', 'vocab')

With ``quantization`` (:mod:`minicpmv_jax.quantization`) the seven projections of every layer (and
``lm_head`` if asked) are ``QuantizedEinsum``: ``kernel`` int8/int4 of the same shape and axes, plus
``scale``.

Activations: the residual stream ``[B, T, D]`` is constrained to ``sharding.RESIDUAL_AXES`` after the
embedding and after every layer, in the sharding context the program is traced in
(:mod:`minicpmv_jax.sharding.context`; no constraint without a mesh). The tower names the axes; which
layout that is (weights stationary for inference, gathered for training) is the rules table's choice,
see :mod:`minicpmv_jax.sharding.rules`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax import sharding

from . import kv_cache as kvc
from .attention import IMPLEMENTATIONS, Mask, attention, resolve
from .config import Qwen2Config
from .layers import Einsum, RMSNorm, normal, param
from .quantization import QuantizationConfig, QuantizedEinsum

# --------------------------------------------------------------------------- pure maths


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``[B, T]`` for a left-padded batch: cumsum(mask) − 1, padded slots get 1 (HF)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """Rotary frequencies ``[H/2]`` (float32): theta^(−2i/H)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Half-split ("rotate_half") rotary embedding of ``x [B, T, N, H]`` at ``positions [B, T]``."""
    h = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(h, theta)   # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]             # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- modules


def projection(quantization: QuantizationConfig | None):
    """The class of a decoder projection: :class:`~minicpmv_jax.layers.Einsum`, or with ``quantization``
    :class:`~minicpmv_jax.quantization.QuantizedEinsum` (same arguments)."""
    if quantization is None:
        return Einsum
    return functools.partial(QuantizedEinsum, quantization=quantization)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs,
                 quantization: QuantizationConfig | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        Einsum = projection(quantization)  # noqa: N806
        self.q = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"),
                        bias_shape=(n, h), bias_axes=("heads", "head_dim"), **common)
        self.k = Einsum("BSD,DKH->BSKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                        bias_shape=(k, h), bias_axes=("kv_heads", "head_dim"), **common)
        self.v = Einsum("BSD,DKH->BSKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                        bias_shape=(k, h), bias_axes=("kv_heads", "head_dim"), **common)
        self.o = Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), fan_in=(0, 1), **common)

    def __call__(self, x, positions, mask: Mask, cache_kv=None, write_index=None, kernel: str = "xla"):
        """x [B, T, D]; cache_kv: (k, v) buffers [B, S, K, H] or None → (y [B, T, D], (k, v)).
        ``kernel``: the attention kernel of this call (:func:`minicpmv_jax.attention.resolve`)."""
        q = apply_rope(self.q(x), positions, self.theta)
        k = apply_rope(self.k(x), positions, self.theta)
        v = self.v(x)
        if cache_kv is not None:
            k = kvc.write(cache_kv[0], k, write_index)
            v = kvc.write(cache_kv[1], v, write_index)
        y = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation=kernel)
        return self.o(y), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs,
                 quantization: QuantizationConfig | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        Einsum = projection(quantization)  # noqa: N806
        self.gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **common)
        self.up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **common)
        self.down = Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **common)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs,
                 quantization: QuantizationConfig | None = None):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, quantization=quantization)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(cfg, **common)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, **common)

    def __call__(self, x, positions, mask: Mask, cache_kv=None, write_index=None, kernel: str = "xla"):
        h, cache_kv = self.attn(self.input_norm(x), positions, mask, cache_kv, write_index, kernel)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return x, cache_kv


class Embedder(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, normal, (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] → [B, T, D] (no scaling)."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Qwen2(nnx.Module):
    """Qwen2 decoder + untied ``lm_head``. ``dtype`` is the computation dtype, ``param_dtype`` storage.

    ``attention`` (one of :data:`minicpmv_jax.attention.IMPLEMENTATIONS`, default ``"auto"``) chooses the
    attention kernel per call (:func:`minicpmv_jax.attention.resolve`): a static attribute like ``remat``,
    so a program compiled for one choice is never reused for another.
    """

    def __init__(self, cfg: Qwen2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention: str = "auto", quantization: QuantizationConfig | None = None):
        if attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {attention!r}")
        self.config = cfg
        self.dtype = dtype
        self.attention = attention
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embedder(cfg.vocab_size, cfg.hidden_size, **common)
        self.layers = nnx.List([DecoderLayer(cfg, **common, quantization=quantization)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        head = projection(quantization if quantization is not None and quantization.lm_head else None)
        self.lm_head = head("BTD,DV->BTV", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), **common)
        # Rematerialise each decoder layer in the backward pass (training; only without a cache): the
        # forward keeps one [B, T, D] residual per layer instead of every intermediate.
        self.remat = False

    def attention_kernel(self, num_queries: int, cached: bool) -> str:
        """The attention kernel a call of ``num_queries`` queries (into a cache or not) runs, traced in the
        current sharding context (:func:`minicpmv_jax.attention.resolve`)."""
        mesh = sharding.current_context().mesh
        return resolve(self.attention, num_queries=num_queries, cached=cached, dtype=self.dtype,
                       sharded=mesh is not None and mesh.size > 1)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids)

    def hidden_states(self, x: jax.Array, positions: jax.Array, mask: Mask,
                      cache: kvc.KVCache | None = None, write_index: jax.Array | None = None
                      ) -> tuple[jax.Array, kvc.KVCache | None]:
        """Runs the layers and the final norm.

        x [B, T, D] embeddings, positions [B, T], ``mask`` which slots each query sees (a causal
        :class:`~minicpmv_jax.attention.Mask` over S slots: S = T without a cache, else the cache length);
        the cache, if given, is written at slots [write_index, write_index + T).
        Returns (hidden [B, T, D], updated cache or None).
        """
        kernel = self.attention_kernel(x.shape[1], cached=cache is not None)
        x = _constrain_residual(x.astype(self.dtype))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            if self.remat and cache is None:
                x = _remat_layer(layer, x, positions, mask.key_valid, kernel, mask.causal_offset)
            else:
                kv = (cache.k[i], cache.v[i]) if cache is not None else None
                x, (k, v) = layer(x, positions, mask, kv, write_index, kernel)
                new_k.append(k)
                new_v.append(v)
            x = _constrain_residual(x)   # every layer: the embedding's layout alone does not hold
        x = self.norm(x)
        new_cache = kvc.KVCache(k=tuple(new_k), v=tuple(new_v)) if cache is not None else None
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, D] → float32 logits [B, T, V]."""
        return self.lm_head(hidden).astype(jnp.float32)

    def final_hidden(self, x: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
        """Full forward without a cache from embeddings x [B, T, D] (left-padded mask [B, T]) → the final
        hidden states [B, T, D] (after the last norm, before ``lm_head``). The multimodal model enters here
        with image features already in place."""
        positions = positions_from_mask(attention_mask_bt)
        hidden, _ = self.hidden_states(x, positions, Mask(attention_mask_bt, 0))
        return hidden

    def __call__(self, ids: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
        """Full forward without a cache: ids [B, T], left-padded mask [B, T] → float32 logits [B, T, V]."""
        return self.logits(self.final_hidden(self.embed(ids), attention_mask_bt))


def _constrain_residual(x: jax.Array) -> jax.Array:
    """The residual stream ``x [B, T, D]`` pinned to ``sharding.RESIDUAL_AXES`` in the current sharding
    context (x itself without a mesh)."""
    return sharding.constrain(x, sharding.RESIDUAL_AXES)


@functools.partial(nnx.remat, static_argnums=(4, 5))
def _remat_layer(layer: DecoderLayer, x: jax.Array, positions: jax.Array, key_valid: jax.Array, kernel: str,
                 causal_offset: int) -> jax.Array:
    """One decoder layer without a cache, recomputed in the backward pass (``Qwen2.remat``). The causal
    offset (0: a full forward) stays a static Python int, so the kernels that need a prefill from slot 0
    still see one."""
    return layer(x, positions, Mask(key_valid, causal_offset), None, None, kernel)[0]
