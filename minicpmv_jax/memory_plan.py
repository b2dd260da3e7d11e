"""Per-device memory of the model on a mesh layout, without loading (or even allocating) a single weight.

It lives above the model (it builds :class:`~minicpmv_jax.model.MiniCPMVModel` abstractly), not in
:mod:`minicpmv_jax.sharding`, which knows logical axes and rules but no model.

``plan_memory(cfg, (data, fsdp, tensor), batch=..., max_len=..., dtype=...)`` builds the model with
``nnx.eval_shape`` (shapes, dtypes and logical axes only), resolves every parameter's spec with the
rules of :mod:`minicpmv_jax.sharding.rules` on a device-free mesh of that shape, and sums the bytes of one device's
piece of each parameter and of the KV cache. Every split is even (the resolver only uses a mesh axis that
divides), so every device holds one piece of the same shape of each array: the per-device number is
exact, and it is the maximum over devices. Activations, compiler temporaries and framework overhead are
not included; leave headroom for them (prefill activations grow with batch × prompt length).

A mesh axis can also split nothing: the resolver skips it wherever it does not divide (``fsdp = 3`` on
Qwen2-7B, whose width is 3584). The plan lists such axes per tower and for the KV cache
(:class:`IdleAxis`: the axis, what it leaves whole, the dimensions it would have split), found with the
same rules and shapes.

With ``quantize="int8"`` / ``"int4"`` (:mod:`minicpmv_jax.quantization`) the model is built quantized: each
covered projection's kernel counts 1 byte (int8) or half a byte (int4, rounded up per array and per
piece) per element, its scale the parameter dtype's bytes, and every spec comes from
:func:`minicpmv_jax.sharding.flat_param_specs`, so a scale is split like its kernel. A converted folder
records its scheme; planning it uses that scheme unless told otherwise (and refuses another one, as
loading does).

``format_plan(plan)`` renders it as a small table for the ``plan`` command of the CLI, with a note per idle
axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from minicpmv_jax import config as C
from minicpmv_jax import orbax_checkpoint
from minicpmv_jax.dtypes import as_dtype
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.model import abstract_model
from minicpmv_jax.quantization import QuantizationConfig, as_quantization
from minicpmv_jax.sharding.mesh import MESH_AXES, abstract_mesh, axis_sizes, mesh_shape, parse_mesh_shape
from minicpmv_jax.sharding.placement import flat_param_specs, kv_cache_spec, logical_axes_of
from minicpmv_jax.sharding.rules import CACHE_AXES, RULES, Rules, check_rules, spec_shard_shape

__all__ = ["PRESETS", "KV_CACHE", "TowerMemory", "IdleAxis", "MemoryPlan", "resolve_config", "abstract_params",
           "plan_memory", "format_plan"]

#: Names accepted instead of a checkpoint folder: the released sizes and the test preset.
PRESETS = {
    "minicpmv-2_6": "minicpmv_2_6", "minicpm-v-2_6": "minicpmv_2_6", "openbmb/minicpm-v-2_6": "minicpmv_2_6",
    "8b": "minicpmv_2_6", "tiny": "tiny",
}

_TOWER_TITLES = {"llm": "llm (Qwen2)", "vpm": "vpm (SigLIP)", "resampler": "resampler"}
#: The name of the KV cache among the arrays an :class:`IdleAxis` leaves whole.
KV_CACHE = "kv_cache"


@dataclasses.dataclass(frozen=True)
class TowerMemory:
    """Parameters of one tower (``llm``, ``vpm`` or ``resampler``)."""

    name: str
    num_params: int
    total_bytes: int            # one full copy
    per_device_bytes: int       # one device's pieces
    replicated_bytes: int       # bytes of the tower's parameters that are not split at all (each device)


@dataclasses.dataclass(frozen=True)
class IdleAxis:
    """A mesh axis of size > 1 that splits nothing of some towers (or of the KV cache): it divides none of
    their dimensions that the rules would split by it, so their arrays are whole on every device along it.

    ``arrays`` names them (tower names, :data:`KV_CACHE`); ``dims`` are those dimensions as (logical axis,
    size) pairs, in the order first met.
    """

    axis: str
    size: int
    arrays: tuple[str, ...]
    dims: tuple[tuple[str, int], ...]

    def dividing_sizes(self, count: int = 4) -> tuple[int, ...]:
        """The ``count`` smallest sizes > 1 that divide at least one of ``dims`` (fewer if there are not)."""
        sizes = sorted({size for _, size in self.dims})
        found = []
        for n in range(2, (sizes[-1] if sizes else 1) + 1):
            if any(size % n == 0 for size in sizes):
                found.append(n)
                if len(found) == count:
                    break
        return tuple(found)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for a ``(data, fsdp, tensor)`` mesh; see the module docstring for what counts."""

    mesh_shape: tuple[int, int, int]
    dtype: str                  # parameter storage dtype
    kv_dtype: str
    batch: int
    max_len: int
    towers: tuple[TowerMemory, ...]
    kv_cache_bytes: int         # all layers, keys and values, one full copy
    kv_cache_bytes_per_device: int
    kv_cache_spec: PartitionSpec
    idle_axes: tuple[IdleAxis, ...] = ()   # mesh axes that leave towers or the KV cache replicated
    quantization: QuantizationConfig | None = None   # the language model's projections (None: in dtype)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def num_params(self) -> int:
        return sum(t.num_params for t in self.towers)

    @property
    def param_bytes(self) -> int:
        return sum(t.total_bytes for t in self.towers)

    @property
    def param_bytes_per_device(self) -> int:
        return sum(t.per_device_bytes for t in self.towers)

    @property
    def bytes_per_device(self) -> int:
        """Parameters + KV cache on each device."""
        return self.param_bytes_per_device + self.kv_cache_bytes_per_device


def resolve_config(model: Any):
    """A ``MiniCPMVConfig`` from a config, a preset name (:data:`PRESETS`), a checkpoint folder or a
    ``config.json`` path."""
    if isinstance(model, C.MiniCPMVConfig):
        return model
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if text.lower() in PRESETS:
            return getattr(C, PRESETS[text.lower()])()
        if os.path.exists(text):
            return C.MiniCPMVConfig.from_pretrained(text)
        raise ArgumentError("{}: not a checkpoint folder, a config.json file, or one of the presets {presets}",
                            f"model={text!r}", presets=sorted(set(PRESETS)))
    raise TypeError(f"model: expected a MiniCPMVConfig, a preset name or a path, got {type(model).__name__}")


@functools.lru_cache(maxsize=4)
def abstract_params(cfg, quantization: QuantizationConfig | None = None) -> nnx.State:
    """``nnx.state(MiniCPMV(cfg, quantize=quantization), nnx.Param)`` as shapes only
    (:func:`~minicpmv_jax.model.abstract_model`), cached per config and scheme.

    Built in bfloat16; shapes and logical axes do not depend on the dtype (callers scale float parameters
    by the item size they want; quantized kernels keep their integer dtype). Do not mutate the returned
    state: it is shared.
    """
    return nnx.state(abstract_model(cfg, "bfloat16", quantize=quantization), nnx.Param)


def _param_bytes(num: int, dtype, itemsize: int) -> int:
    """Bytes of ``num`` elements of a parameter held as ``dtype`` (abstract): integers (quantized
    kernels) at their own width, int4 two per byte rounded up; floats at the plan's ``itemsize``."""
    if not jnp.issubdtype(dtype, jnp.integer):
        return num * itemsize
    return -(-num * jnp.iinfo(dtype).bits // 8)


def _quantization(model: Any, quantize: Any) -> QuantizationConfig | None:
    """``quantize`` as a scheme; for a converted folder, checked against the scheme it records (the
    recorded one when ``quantize`` is None), as loading it would."""
    quantization = as_quantization(quantize)
    if isinstance(model, (str, os.PathLike)):
        folder = os.fspath(model)
        if os.path.isdir(folder) and orbax_checkpoint.is_converted(folder):
            return orbax_checkpoint.stored_quantization(folder, quantization)
    return quantization


def _dtype_name(dtype: Any) -> str:
    return as_dtype(dtype).name


def _mesh(mesh: Any) -> AbstractMesh | Mesh:
    if isinstance(mesh, (Mesh, AbstractMesh)):
        return mesh
    sizes = parse_mesh_shape(mesh, allow_rest=False) if isinstance(mesh, str) else tuple(mesh)
    return abstract_mesh(*sizes)


def plan_memory(model: Any, mesh: Any = (1, 1, 1), *, batch: int = 1, max_len: int = 4096,
                dtype: Any = "bfloat16", kv_dtype: Any = None, rules: Rules = RULES,
                quantize: str | QuantizationConfig | None = None) -> MemoryPlan:
    """Per-device parameter and KV-cache bytes of ``model`` on a ``(data, fsdp, tensor)`` mesh.

    Args:
      model: a ``MiniCPMVConfig``, a preset name (``"minicpmv-2_6"``, ``"tiny"``), a checkpoint folder or
        its ``config.json``. No weights are read.
      mesh: ``(data, fsdp, tensor)`` sizes, a ``"DxFxT"`` string, or a (possibly abstract) mesh. The
        devices need not exist.
      batch, max_len: the KV cache holds ``batch`` sequences of ``max_len`` slots (prompt + new tokens).
      dtype: parameter storage dtype; ``kv_dtype`` the cache's (default: ``dtype``, as generation does).
      rules: the logical-axis rules table.
      quantize: ``"int8"``, ``"int4"`` or a :class:`~minicpmv_jax.quantization.QuantizationConfig`: the
        language model's projections quantized, as ``from_pretrained(quantize=)`` holds them (their scales
        in ``dtype``). A converted folder's own scheme is used when left out.
    """
    quantization = _quantization(model, quantize)
    cfg = resolve_config(model)
    mesh = _mesh(mesh)
    for name, value in (("batch", batch), ("max_len", max_len)):
        if value < 1:
            raise ArgumentError("{} must be positive", f"{name}={value}")
    dtype_name = _dtype_name(dtype)
    kv_name = _dtype_name(kv_dtype if kv_dtype is not None else dtype)
    itemsize = np.dtype(dtype_name).itemsize       # every float parameter is stored in the one param dtype
    towers: dict[str, list[int]] = {}
    arrays = []                                    # (tower or KV_CACHE, logical axes, shape, spec)
    params = abstract_params(cfg, quantization)
    specs = flat_param_specs(params, mesh, rules)  # a quantized kernel's scale follows its kernel
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        axes = logical_axes_of(var, path)
        spec = specs[path]
        arrays.append((str(path[0]), axes, value.shape, spec))
        total = _param_bytes(math.prod(value.shape), value.dtype, itemsize)
        piece = _param_bytes(math.prod(spec_shard_shape(value.shape, spec, mesh)), value.dtype, itemsize)
        acc = towers.setdefault(str(path[0]), [0, 0, 0, 0])
        acc[0] += math.prod(value.shape)
        acc[1] += total
        acc[2] += piece
        acc[3] += total if piece == total else 0
    llm = cfg.llm
    shape = (batch, max_len, llm.num_key_value_heads, llm.head_dim)    # one buffer; k and v per layer
    kv_spec = kv_cache_spec(shape, mesh, rules)
    kv_item = np.dtype(kv_name).itemsize
    buffers = 2 * llm.num_hidden_layers
    kv_total = buffers * math.prod(shape) * kv_item
    kv_piece = buffers * math.prod(spec_shard_shape(shape, kv_spec, mesh)) * kv_item
    arrays.append((KV_CACHE, CACHE_AXES, shape, kv_spec))
    names = sorted(towers, key=_tower_order)
    return MemoryPlan(
        mesh_shape=mesh_shape(mesh), dtype=dtype_name, kv_dtype=kv_name, batch=batch, max_len=max_len,
        towers=tuple(TowerMemory(name, *towers[name]) for name in names),
        kv_cache_bytes=kv_total, kv_cache_bytes_per_device=kv_piece, kv_cache_spec=kv_spec,
        idle_axes=_idle_axes(arrays, [*names, KV_CACHE], mesh, rules), quantization=quantization)


def _idle_axes(arrays: Sequence[tuple[str, Sequence[str | None], Sequence[int], PartitionSpec]], order: list[str],
               mesh: AbstractMesh | Mesh, rules: Rules) -> tuple[IdleAxis, ...]:
    """The mesh axes of size > 1 that no spec of some group of ``arrays`` uses although the rules name them
    for some of the group's dimensions (:class:`IdleAxis`); groups in ``order``.

    ``arrays``: ``(group, logical axes, shape, spec)`` per array.
    """
    sizes = {axis: size for axis, size in axis_sizes(mesh).items() if size > 1}
    candidates = dict(check_rules(rules))
    would: dict[tuple[str, str], dict[tuple[str, int], None]] = {}   # (group, mesh axis) → dims (ordered set)
    used: set[tuple[str, str]] = set()
    for group, axes, shape, spec in arrays:
        for name, size in zip(axes, shape):
            for axis in candidates.get(name, ()) if name is not None else ():
                if axis in sizes:
                    would.setdefault((group, axis), {})[(name, int(size))] = None
        for entry in spec:
            used.update((group, axis) for axis in ((entry,) if isinstance(entry, str) else entry or ()))
    idle = []
    for axis in (a for a in MESH_AXES if a in sizes):
        groups = [g for g in order if (g, axis) in would and (g, axis) not in used]
        if groups:
            dims = {dim: None for g in groups for dim in would[(g, axis)]}
            idle.append(IdleAxis(axis, sizes[axis], tuple(groups), tuple(dims)))
    return tuple(idle)


def _tower_order(name: str) -> tuple[int, str]:
    order = list(_TOWER_TITLES)
    return (order.index(name) if name in order else len(order), name)


def _gib(n: int) -> str:
    return f"{n / 2**30:9.2f} GiB"


def format_plan(plan: MemoryPlan, device_memory_gib: float | None = None) -> str:
    """A text table of ``plan``; with ``device_memory_gib`` (e.g. 16 for a TPU v5e chip) also the headroom."""
    mesh = " × ".join(f"{n}={s}" for n, s in zip(MESH_AXES, plan.mesh_shape))
    devices = f"{plan.num_devices} device" + ("" if plan.num_devices == 1 else "s")
    quantized = "" if plan.quantization is None else (
        f" (llm projections {plan.quantization.mode}" + (", lm_head too" if plan.quantization.lm_head else "")
        + f", scales {plan.dtype})")
    lines = [f"mesh {mesh} ({devices}); parameters {plan.dtype}{quantized}, KV cache {plan.kv_dtype}",
             f"{'':34}{'parameters':>14}{'total':>14}{'per device':>14}"]
    for t in plan.towers:
        lines.append(f"  {_TOWER_TITLES.get(t.name, t.name):32}{t.num_params:14,}{_gib(t.total_bytes):>14}"
                     f"{_gib(t.per_device_bytes):>14}")
    lines.append(f"  {'all parameters':32}{plan.num_params:14,}{_gib(plan.param_bytes):>14}"
                 f"{_gib(plan.param_bytes_per_device):>14}")
    kv = f"KV cache {plan.batch} × {plan.max_len} slots"
    lines.append(f"  {kv:32}{'':14}{_gib(plan.kv_cache_bytes):>14}{_gib(plan.kv_cache_bytes_per_device):>14}")
    lines.append(f"    (each layer's K and V buffer [B, S, K, H] split as {plan.kv_cache_spec})")
    lines.append(f"  {'per device (params + KV cache)':32}{'':28}{_gib(plan.bytes_per_device):>14}")
    if device_memory_gib is not None:
        left = device_memory_gib * 2**30 - plan.bytes_per_device
        verdict = "left for activations and temporaries" if left >= 0 else "OVER the device memory"
        lines.append(f"  {device_memory_gib:g} GiB per device: {abs(left) / 2**30:.2f} GiB {verdict}")
    lines.append("  (activations, compiler temporaries and runtime overhead come on top)")
    lines.extend(_idle_note(idle) for idle in plan.idle_axes)
    return "\n".join(lines)


def _idle_note(idle: IdleAxis) -> str:
    """One line saying what ``idle`` leaves replicated, and which sizes would split something."""
    titles = [_TOWER_TITLES.get(a, "the KV cache" if a == KV_CACHE else a) for a in idle.arrays]
    dims = ", ".join(f"{name} {size}" for name, size in idle.dims)
    sizes = idle.dividing_sizes()
    advice = f"; sizes that divide some of them: {', '.join(map(str, sizes))}" if sizes else ""
    return (f"note: {idle.axis}={idle.size} divides none of the dimensions it would split ({dims}), so "
            f"{' and '.join(titles)} {'is' if len(titles) == 1 else 'are'} replicated over it{advice}")
