"""The static key/value cache of the Qwen2 decoder: an explicit pytree passed in and returned.

One buffer pair per layer (per-layer buffers, not one stacked array: on CPU a decode loop over stacked
layer weights/caches made XLA copy a layer per step, 2.6x slower for Qwen2-0.5B). Slots are positions in the padded
sequence: a prefill writes slots ``[i, i + T)``, a decode step writes one slot. Which slots hold real
tokens is the caller's business (``key_valid``, see :mod:`minicpmv_jax.attention`'s causal mask).

On a mesh every buffer follows the logical axes ``CACHE_AXES`` (:func:`minicpmv_jax.sharding.kv_cache_spec`):
:func:`shardings` gives a cache's ``NamedSharding`` tree, :func:`sharded_zeros` creates one in its shards,
and :func:`constrain` pins a cache created inside a traced program to the current sharding context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jax.sharding import Mesh

from minicpmv_jax import sharding

from .config import Qwen2Config


@struct.dataclass
class KVCache:
    """Per-layer key and value buffers, each ``[B, S, K, H]``."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: Qwen2Config, batch: int, length: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers))

    @property
    def length(self) -> int:
        """Number of slots S."""
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def write(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Writes ``update [B, T, K, H]`` into ``buffer [B, S, K, H]`` at slots ``[index, index + T)``;
    ``index`` is one slot for every row (``[]``) or one per row (``[B]``)."""
    zero = jnp.zeros((), jnp.int32)
    index = jnp.asarray(index, jnp.int32)
    update = update.astype(buffer.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buffer, update, (zero, index, zero, zero))
    return jax.vmap(lambda row, new, i: jax.lax.dynamic_update_slice(row, new, (i, zero, zero)))(
        buffer, update, index)


def shardings(cache: KVCache, mesh: Mesh, rules: sharding.Rules = sharding.RULES) -> KVCache:
    """A ``KVCache`` of ``NamedSharding`` for ``cache`` (concrete or abstract): its ``in_shardings`` /
    ``out_shardings`` in a ``jax.jit``."""
    return jax.tree.map(lambda b: sharding.kv_cache_sharding(b.shape, mesh, rules), cache)


def sharded_zeros(cfg: Qwen2Config, batch: int, length: int, mesh: Mesh, dtype=jnp.bfloat16,
                  rules: sharding.Rules = sharding.RULES) -> KVCache:
    """A zero cache ``[batch, length, K, H]`` per layer, created directly in its shards (no full copy)."""
    abstract = jax.eval_shape(lambda: KVCache.zeros(cfg, batch, length, dtype))
    return jax.jit(lambda: KVCache.zeros(cfg, batch, length, dtype), out_shardings=shardings(abstract, mesh, rules))()


def constrain(cache: KVCache) -> KVCache:
    """Every buffer of a cache created inside a traced program pinned to ``CACHE_AXES`` in the current
    sharding context (:func:`minicpmv_jax.sharding.constrain`; a no-op without a mesh)."""
    return jax.tree.map(lambda b: sharding.constrain(b, sharding.CACHE_AXES), cache)
