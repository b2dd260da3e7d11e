"""The static key/value cache of the Qwen2 decoder: an explicit pytree passed in and returned.

One buffer pair per layer (per-layer buffers, not one stacked array: on CPU a decode loop over stacked
layer weights/caches made XLA copy a layer per step, 2.6x slower for Qwen2-0.5B). Slots are positions in the padded
sequence: a prefill writes slots ``[i, i + T)``, a decode step writes one slot. Which slots hold real
tokens is the caller's business (``key_valid`` in :func:`minicpmv_jax.qwen2.attention_mask`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

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
    """Writes ``update [B, T, K, H]`` into ``buffer [B, S, K, H]`` at slots ``[index, index + T)``."""
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype),
                                        (zero, jnp.asarray(index, jnp.int32), zero, zero))
