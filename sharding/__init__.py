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
  :func:`shard_model`, the batch and KV-cache-buffer shardings (from shapes), and :func:`constrain` for
  activations.
* :mod:`minicpmv_jax.sharding.context` — the mesh and rules that constrain activations while a program is
  traced (:func:`use_mesh`, :func:`use_rules`): context, never state on a model.

The package knows no model: the memory plan of the model on a mesh is :mod:`minicpmv_jax.memory_plan`,
and the KV cache's own helpers (a zero cache created in its shards, the cache constrained inside jit) are
in :mod:`minicpmv_jax.kv_cache`.

Typical use::

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model = MiniCPMV.from_pretrained(path, mesh=mesh)   # into shards; chat / compute_logits run there
    with sharding.use_rules(sharding.TRAINING_RULES):   # another activation layout, parameters stay put
        logits = model.compute_logits(batch)
    model = sharding.shard_model(model, mesh)           # a bare module: its parameters onto the mesh
    shardings = sharding.flat_param_shardings(abstract_model, mesh)  # -> load_entries / restore_params
    with sharding.use_mesh(mesh):                       # your own program: residual constraints on
        y = jax.jit(fn)(...)
"""

from .mesh import MESH_AXES, abstract_mesh, axis_sizes, make_mesh, mesh_from_text, mesh_shape, parse_mesh_shape
from .context import ShardingContext, context_for, current_context, use_mesh, use_rules
from .placement import (abstract_with_shardings, batch_sharding, batch_spec, constrain, flat_param_shardings,
                        flat_param_specs, follow_spec, kv_cache_sharding, kv_cache_spec, logical_axes_of, param_shardings, param_specs,
                        shard_batch, shard_model)
from .rules import (ACTIVATION_AXES, CACHE_AXES, LOGICAL_AXES, RESIDUAL_AXES, RULES, TRAINING_RULES, Rules,
                    check_rules, logical_to_spec, num_shards, override_rules, shards_per_dim, spec_shard_shape)

__all__ = [
    # mesh
    "MESH_AXES", "make_mesh", "abstract_mesh", "parse_mesh_shape", "mesh_from_text", "axis_sizes", "mesh_shape",
    # rules
    "Rules", "RULES", "TRAINING_RULES", "LOGICAL_AXES", "ACTIVATION_AXES", "RESIDUAL_AXES", "CACHE_AXES",
    "check_rules", "override_rules", "logical_to_spec", "shards_per_dim", "num_shards", "spec_shard_shape",
    # placement
    "logical_axes_of", "param_specs", "flat_param_specs", "follow_spec", "param_shardings", "flat_param_shardings",
    "abstract_with_shardings", "shard_model", "batch_spec", "batch_sharding", "shard_batch", "kv_cache_spec", "kv_cache_sharding",
    "constrain",
    # context
    "ShardingContext", "use_mesh", "use_rules", "current_context", "context_for",
]
