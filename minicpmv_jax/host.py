"""Host ↔ device: numpy inputs onto the model's devices, results back, on one or many processes.

Every process of a multi-host run builds the same host arrays (the same prompts and images); ``put``
gives each local device its slice of them (``jax.make_array_from_callback``), so no process needs the
others' data. ``fetch`` gathers a result that spans processes, so every caller gets the whole answer.
Without a mesh both are plain conversions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from minicpmv_jax import sharding

__all__ = ["put", "place", "fetch"]


def put(x: Any, mesh=None, batch_axis: bool = True) -> jax.Array:
    """``x`` (host array) on ``mesh``: split along its leading batch axis per the sharding rules
    (``batch_axis``) or replicated; ``jnp.asarray(x)`` without a mesh."""
    if mesh is None:
        return jnp.asarray(x)
    x = np.asarray(x)
    return place(x, sharding.batch_sharding(x.shape, mesh) if batch_axis else NamedSharding(mesh, PartitionSpec()))


def place(x: Any, target: jax.sharding.Sharding) -> jax.Array:
    """Host array ``x`` laid out as ``target``: each local device receives its slice (every process passes
    the same ``x``)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def fetch(x: Any) -> np.ndarray:
    """A device array as numpy on this process (gathered from every process of a multi-host mesh)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
