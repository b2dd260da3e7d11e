"""Placing the model, a batch and the KV cache on a mesh, and constraining activations inside jit.

Everything here resolves logical axes with :func:`minicpmv_jax.sharding.rules.logical_to_spec`; nothing hard-codes a
mesh axis. Parameters are read from ``nnx.Param`` metadata: flax 0.12.8 keeps the tuple given as
``out_sharding=`` at creation in ``param.get_metadata()["out_sharding"]`` (``sharding_names`` is its
deprecated alias); the model creates every parameter with ``eager_sharding=False``, so nothing is placed
until one of these helpers does it.

Trees returned for parameters mirror ``nnx.state(model, nnx.Param)`` (same Variables, the value replaced
by a spec / sharding / ``ShapeDtypeStruct``), so they can be passed as ``jax.jit`` ``in_shardings`` /
``out_shardings`` for the state half of ``nnx.split`` or to ``jax.device_put``. The flat form
(``{path: NamedSharding}``) is what the checkpoint loaders take (``checkpoint_names.load_entries`` and
``orbax_checkpoint.restore_params``, argument ``shardings=``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .context import current_context
from .rules import CACHE_AXES, RULES, Rules, logical_to_spec, shards_per_dim

__all__ = [
    "logical_axes_of", "param_specs", "flat_param_specs", "follow_spec", "param_shardings", "flat_param_shardings",
    "abstract_with_shardings",
    "shard_model", "batch_spec", "batch_sharding", "shard_batch", "kv_cache_spec", "kv_cache_sharding",
    "constrain",
]

Path = tuple[str | int, ...]


def _show(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _param_state(module_or_state: nnx.Module | nnx.State) -> nnx.State:
    if isinstance(module_or_state, nnx.Module):
        return nnx.state(module_or_state, nnx.Param)
    if isinstance(module_or_state, nnx.State):
        return module_or_state
    raise TypeError(f"expected an nnx.Module or nnx.State, got {type(module_or_state).__name__}")


def logical_axes_of(var: nnx.Variable, path: Path = ()) -> tuple[str | None, ...]:
    """The logical axes a parameter was created with; an ``nnx.Param`` without them is an error.

    Variables that are not parameters (e.g. RNG counters) are replicated: all ``None``.
    """
    axes = var.get_metadata().get("out_sharding")
    shape = tuple(var.get_value().shape)
    if axes is None:
        if isinstance(var, nnx.Param):
            raise ValueError(f"parameter {_show(path)} {list(shape)} has no logical axes; create it with "
                             "minicpmv_jax.layers.param(..., axes) (nnx.Param(value, out_sharding=axes))")
        return (None,) * len(shape)
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"parameter {_show(path)}: logical axes {axes} do not match its shape {list(shape)}")
    return axes


def _map_params(fn: Callable[[Path, nnx.Variable], Any], module_or_state) -> nnx.State:
    """A state of the same structure whose Variables hold ``fn(path, variable)`` as value."""
    flat = nnx.to_flat_state(_param_state(module_or_state))
    return nnx.from_flat_state([(path, var.replace(fn(path, var))) for path, var in flat])


def flat_param_specs(module_or_state, mesh, rules: Rules = RULES) -> dict[Path, PartitionSpec]:
    """``{nnx path: PartitionSpec}`` of every parameter: its logical axes resolved by the rules.

    A parameter created with ``follows=NAME`` metadata (a quantized kernel's ``scale``: ``follows="kernel"``)
    takes its sibling ``NAME``'s resolved spec instead, per dimension where that split divides its own size
    (else that dimension is replicated). The rules fall back by divisibility per array, so resolving a
    scale ``[1, 1, D]`` on its own could split ``D`` over an axis its kernel ``[N, H, D]`` spends on ``H``;
    following keeps a scale on the devices that hold its kernel's columns.
    """
    flat = list(nnx.to_flat_state(_param_state(module_or_state)))
    specs = {path: logical_to_spec(logical_axes_of(var, path), var.get_value().shape, mesh, rules)
             for path, var in flat if var.get_metadata().get("follows") is None}
    for path, var in flat:
        follows = var.get_metadata().get("follows")
        if follows is None:
            continue
        lead = specs.get(path[:-1] + (follows,))
        if lead is None:
            raise ValueError(f"parameter {_show(path)} follows {follows!r}, which is not a parameter beside it")
        logical_axes_of(var, path)                       # checked all the same
        specs[path] = follow_spec(lead, var.get_value().shape, mesh)
    return specs


def follow_spec(lead: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
    """``lead``'s split, per dimension, for an array of ``shape`` that follows the array ``lead`` places
    (a quantized kernel's scale): kept where it divides ``shape``, replicated where it does not."""
    per_dim = shards_per_dim(lead, len(shape), mesh)
    entries = tuple(lead) + (None,) * (len(shape) - len(lead))
    return PartitionSpec(*(entry if shape[i] % per_dim[i] == 0 else None for i, entry in enumerate(entries)))


def _flat_param_values(module_or_state, values: dict[Path, Any]) -> nnx.State:
    flat = nnx.to_flat_state(_param_state(module_or_state))
    return nnx.from_flat_state([(path, var.replace(values[path])) for path, var in flat])


def param_specs(module_or_state, mesh, rules: Rules = RULES) -> nnx.State:
    """``PartitionSpec`` of every parameter (tree mirroring ``nnx.state(model, nnx.Param)``).

    ``mesh`` may be abstract (:func:`minicpmv_jax.sharding.mesh.abstract_mesh`, or a ``(d, f, t)`` tuple): only the axis
    sizes matter. Works on concrete and abstract (``nnx.eval_shape``) models alike.
    """
    return _flat_param_values(module_or_state, flat_param_specs(module_or_state, mesh, rules))


def param_shardings(module_or_state, mesh: Mesh, rules: Rules = RULES) -> nnx.State:
    """``NamedSharding`` of every parameter (tree mirroring ``nnx.state(model, nnx.Param)``)."""
    specs = param_specs(module_or_state, mesh, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def flat_param_shardings(module_or_state, mesh: Mesh, rules: Rules = RULES) -> dict[Path, NamedSharding]:
    """``{nnx path: NamedSharding}``, e.g. ``("llm", "layers", 0, "attn", "q", "kernel")`` — the form the
    loaders take (``load_entries(..., shardings=)``, ``restore_params(..., shardings=)``)."""
    return {path: NamedSharding(mesh, spec) for path, spec in flat_param_specs(module_or_state, mesh, rules).items()}


def abstract_with_shardings(module_or_state, mesh: Mesh, rules: Rules = RULES) -> nnx.State:
    """The parameter state as ``jax.ShapeDtypeStruct`` leaves that carry their target ``NamedSharding``.

    Input: an abstract model (``nnx.eval_shape(lambda: MiniCPMV(cfg, rngs=nnx.Rngs(0)))``) or its state.
    Restoring into this tree (Orbax) reads each device's shards directly; ``nnx.merge(graphdef, tree)``
    gives an abstract model whose leaves say where every parameter will live.
    """
    specs = flat_param_specs(module_or_state, mesh, rules)

    def leaf(path, var):
        value = var.get_value()
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, specs[path]))

    return _map_params(leaf, module_or_state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = RULES) -> nnx.Module:
    """Moves every parameter of ``model`` onto ``mesh`` per the rules, in place; returns ``model``.

    One parameter at a time, so the extra memory is one parameter, not one model. Values are unchanged.
    A parameter that already has its target sharding is left alone (no copy; this is also what makes
    re-sharding with a table that differs only in activation rows, e.g. ``TRAINING_RULES``, free, and
    possible for arrays that span several processes).
    """
    specs = flat_param_specs(model, mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        target = NamedSharding(mesh, specs[path])
        if not (isinstance(value, jax.Array) and value.sharding == target):
            var.set_value(_put(value, target))
    return model


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    """``device_put``; an array living on CPU devices goes through a numpy view instead: CPU "devices"
    share host memory, and a device-to-device move compiles a resharding program per shape (measured:
    7 s for the tiny model's ~60 parameters on 8 simulated devices, against 0.1 s through numpy)."""
    if isinstance(value, jax.Array) and all(d.platform == "cpu" for d in value.devices()):
        value = np.asarray(value)
    return jax.device_put(value, sharding)


# --------------------------------------------------------------------------- batch


def batch_spec(shape: Sequence[int], mesh, rules: Rules = RULES) -> PartitionSpec:
    """Spec of an input whose axis 0 is the batch: ``[B]``, ``[B, T]`` (``("batch", "length")``) or
    ``[B, T, ...]`` (further axes replicated). B is split over data, then fsdp, where they divide it."""
    shape = tuple(shape)
    axes = ("batch", "length", *(None,) * max(0, len(shape) - 2))[: len(shape)]
    return logical_to_spec(axes, shape, mesh, rules)


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """``NamedSharding`` for an input with a leading batch axis (see :func:`batch_spec`)."""
    return NamedSharding(mesh, batch_spec(shape, mesh, rules))


def shard_batch(tree: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """``jax.device_put`` of every array leaf of ``tree`` (numpy or jax, leading batch axis) onto ``mesh``.

    E.g. ``shard_batch({"input_ids": ids, "attention_mask": mask}, mesh)``; non-array leaves pass through.
    """
    def put(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        return jax.device_put(x, batch_sharding(x.shape, mesh, rules))

    return jax.tree.map(put, tree)


# --------------------------------------------------------------------------- KV cache


def kv_cache_spec(shape: Sequence[int], mesh, rules: Rules = RULES) -> PartitionSpec:
    """Spec of one KV-cache buffer of ``shape`` ``[B, S, K, H]`` (logical :data:`CACHE_AXES`).

    Default rules: B over data (+ fsdp) where it divides, K over tensor when it divides, else H over
    tensor (the k/v projections' layout), S replicated. Map it over a cache's buffers, e.g.
    ``jax.tree.map(lambda b: kv_cache_spec(b.shape, mesh), cache)``; ``minicpmv_jax.kv_cache`` does.
    """
    shape = tuple(shape)
    if len(shape) != len(CACHE_AXES):
        raise ValueError(f"a KV-cache buffer is [B, S, K, H], got shape {list(shape)}")
    return logical_to_spec(CACHE_AXES, shape, mesh, rules)


def kv_cache_sharding(shape: Sequence[int], mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """``NamedSharding`` of one KV-cache buffer ``[B, S, K, H]`` (see :func:`kv_cache_spec`)."""
    return NamedSharding(mesh, kv_cache_spec(shape, mesh, rules))


# --------------------------------------------------------------------------- activations


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None = None,
              rules: Rules | None = None) -> jax.Array:
    """``with_sharding_constraint`` of activation ``x`` by logical names, e.g. the LLM's residual stream
    ``constrain(h, RESIDUAL_AXES)`` with ``RESIDUAL_AXES = ("act_batch", "length", "act_embed")``.

    ``mesh`` and ``rules`` default to the sharding context the caller is traced in
    (:func:`minicpmv_jax.sharding.use_mesh`); without a mesh there, the mesh of ``jax.set_mesh``; a no-op
    without either (single-device code runs unchanged). Splits follow the same divisibility rule as
    parameters.
    """
    context = current_context()
    mesh = mesh if mesh is not None else context.mesh
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        mesh = None if abstract.empty else abstract
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, context.rules if rules is None else rules)
    target = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    return jax.lax.with_sharding_constraint(x, target)
