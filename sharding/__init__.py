"""Meshes and logical-axis rules for minicpmv-jax (mesh axes ``data`` / ``fsdp`` / ``tensor``).

Every parameter declares logical axis names where it is created (see :mod:`minicpmv_jax.layers`); this
package is the only place that maps them to mesh axes. The modules:

* :mod:`minicpmv_jax.sharding.mesh` — :func:`make_mesh` (``-1`` = the rest of the devices), :func:`abstract_mesh`
  (device-free, for planning), :func:`parse_mesh_shape` (``"DxFxT"``).
* :mod:`minicpmv_jax.sharding.rules` — the ordered :data:`RULES` table (inference) and :data:`TRAINING_RULES` (the
  same but for the residual stream's layout), and :func:`logical_to_spec`, which only uses a mesh axis
  where it divides the dimension; the fallbacks (``head_dim`` when heads do not divide, ``embed`` when the
  vocabulary does not), the residual-stream layouts and their decode cost are documented there.
* :mod:`minicpmv_jax.sharding.placement` — specs / shardings / sharded abstract trees for the parameters,
  :func:`shard_model`, the batch and KV-cache shardings, and :func:`constrain` for activations.

The memory plan of the model on a mesh (it needs the model, which this package does not know) is
:mod:`minicpmv_jax.memory_plan`.

Typical use::

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model = MiniCPMV.from_pretrained(path, mesh=mesh)   # into shards; activations constrained per RULES
    model.shard(mesh, sharding.TRAINING_RULES)          # training: other activation layout, params stay put
    model = sharding.shard_model(model, mesh)           # a bare module: parameters only, no constraints
    shardings = sharding.flat_param_shardings(abstract_model, mesh)  # -> load_entries / restore_params
    cache = sharding.sharded_kv_cache(cfg, batch, max_len, mesh)
    step = jax.jit(fn, in_shardings=(..., sharding.kv_cache_shardings(cache, mesh)), ...)
"""

from .mesh import MESH_AXES, abstract_mesh, axis_sizes, make_mesh, mesh_shape, parse_mesh_shape
from .placement import (abstract_with_shardings, batch_sharding, batch_spec, constrain, constrain_kv_cache,
                        flat_param_shardings, kv_cache_shardings, kv_cache_specs, logical_axes_of,
                        param_shardings, param_specs, shard_batch, shard_model, sharded_kv_cache)
from .rules import (ACTIVATION_AXES, CACHE_AXES, LOGICAL_AXES, RESIDUAL_AXES, RULES, TRAINING_RULES, Rules,
                    check_rules, logical_to_spec, num_shards, override_rules, shards_per_dim, spec_shard_shape)

__all__ = [
    # mesh
    "MESH_AXES", "make_mesh", "abstract_mesh", "parse_mesh_shape", "axis_sizes", "mesh_shape",
    # rules
    "Rules", "RULES", "TRAINING_RULES", "LOGICAL_AXES", "ACTIVATION_AXES", "RESIDUAL_AXES", "CACHE_AXES",
    "check_rules", "override_rules", "logical_to_spec", "shards_per_dim", "num_shards", "spec_shard_shape",
    # placement
    "logical_axes_of", "param_specs", "param_shardings", "flat_param_shardings", "abstract_with_shardings",
    "shard_model", "batch_spec", "batch_sharding", "shard_batch", "kv_cache_specs", "kv_cache_shardings",
    "sharded_kv_cache", "constrain", "constrain_kv_cache",
]
