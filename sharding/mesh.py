"""The device mesh: three named axes ``data``, ``fsdp`` and ``tensor``.

* ``data``   — pure data parallelism: the batch is split, parameters are replicated.
* ``fsdp``   — the batch is split *and* every large parameter is split along its model-width axis
  (``embed`` / ``vision_embed``); XLA gathers a layer's weights where they are used.
* ``tensor`` — Megatron-style tensor parallelism: heads, MLP width and vocabulary are split, with one
  all-reduce after the attention and one after the MLP block (details in :mod:`minicpmv_jax.sharding.rules`).

``make_mesh(data=1, fsdp=-1, tensor=1)`` (the default) is pure FSDP over all devices. ``-1`` in one
position means "the rest of the devices". Meshes use ``AxisType.Auto`` axes: shardings are hints that
GSPMD propagates, so the model code needs no explicit-sharding annotations on every operation (jax
0.10's :func:`jax.make_mesh` defaults to ``Explicit`` axes, which this package does not use).

Planning needs no devices at all: :func:`abstract_mesh` builds a :class:`jax.sharding.AbstractMesh` of any
size (e.g. a 256-chip slice on a laptop), and :func:`axis_sizes` accepts either kind.

Bad sizes raise :class:`minicpmv_jax.errors.ArgumentError` (a ``ValueError``) naming the setting as Python
spells it (``fsdp=0``, ``mesh='1x0x1'``), so that the command line can name its flag instead.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

from minicpmv_jax.errors import ArgumentError

__all__ = ["MESH_AXES", "MeshLike", "make_mesh", "abstract_mesh", "parse_mesh_shape", "mesh_from_text", "axis_sizes",
           "mesh_shape"]

#: Names of the mesh axes, outermost first (``data`` spans hosts/slices, ``tensor`` the fastest links).
MESH_AXES = ("data", "fsdp", "tensor")

MeshLike = Mesh | AbstractMesh | Mapping[str, int] | Sequence[int]


def _devices(n: int) -> str:
    """``"1 device"``, ``"8 devices"``."""
    return f"{n} device" if n == 1 else f"{n} devices"


def _resolve_sizes(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Fills a single ``-1`` with the remaining device count; checks that the product matches."""
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ArgumentError("{} must be a positive integer or -1 (the rest of the devices)", f"{name}={size!r}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ArgumentError("only one axis may be -1, got " + " and ".join(["{}"] * len(rest)),
                            *(f"{n}=-1" for n in rest))
    fixed = {n: s for n, s in sizes.items() if s != -1}
    fixed_product = math.prod(fixed.values())
    if rest:
        if num_devices % fixed_product:
            raise ArgumentError("{} takes the rest of the {devices}, but {count} is not divisible by "
                                + " × ".join(["{}"] * len(fixed)) + " = {product}",
                                f"{rest[0]}=-1", *(f"{n}={s}" for n, s in fixed.items()),
                                devices=_devices(num_devices), count=num_devices, product=fixed_product)
        sizes = {**sizes, rest[0]: num_devices // fixed_product}
    product = math.prod(sizes.values())
    if product != num_devices:
        raise ArgumentError(" × ".join(["{}"] * len(sizes)) + " = {product}, but {given} {verb} given; the product "
                            "of the axis sizes must equal the device count (use -1 for one axis to take the rest)",
                            *(f"{n}={s}" for n, s in sizes.items()), product=_devices(product),
                            given=_devices(num_devices), verb="is" if num_devices == 1 else "are")
    return tuple(sizes.values())


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of ``jax.devices()``).

    One size may be ``-1`` for "the rest of the devices". Errors (a
    :class:`~minicpmv_jax.errors.ArgumentError`) name the axis sizes and the device count when the product
    does not match. The device order comes from :func:`jax.make_mesh` (topology aware on TPU: ``tensor``
    gets the closest chips).
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ArgumentError("{}: no devices to build a mesh on", "devices=[]")
    shape = _resolve_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devs))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devs)


def abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> AbstractMesh:
    """A device-free ``(data, fsdp, tensor)`` mesh of any size, for planning and spec computation.

    Every size must be a positive integer: without devices, ``-1`` ("the rest") has no meaning.
    """
    for name, size in zip(MESH_AXES, (data, fsdp, tensor)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ArgumentError("{} must be a positive integer", f"{name}={size!r}")
    return AbstractMesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


_SHAPE_RE = re.compile(r"^\s*(-?\d+)\s*[xX×,]\s*(-?\d+)\s*[xX×,]\s*(-?\d+)\s*$")


def parse_mesh_shape(text: str, allow_rest: bool = True) -> tuple[int, int, int]:
    """``"2x2x2"`` (data × fsdp × tensor; ``,`` or ``×`` also accepted) → ``(2, 2, 2)``.

    With ``allow_rest`` one size may be ``-1`` (the rest of the devices, for :func:`make_mesh`); without
    (a plan for devices that need not exist, :func:`abstract_mesh`) every size must be positive. Errors are
    :class:`~minicpmv_jax.errors.ArgumentError` naming the setting ``mesh``.
    """
    m = _SHAPE_RE.match(text)
    if not m:
        raise ArgumentError("{}: expected a mesh shape DATAxFSDPxTENSOR, e.g. 1x1x8 or 2x4x1", f"mesh={text!r}")
    sizes = tuple(int(g) for g in m.groups())
    allowed = "a positive integer or -1 (the rest of the devices)" if allow_rest else "a positive integer"
    for name, size in zip(MESH_AXES, sizes):
        if size < 1 and not (allow_rest and size == -1):
            raise ArgumentError("{}: {axis}={size} must be {allowed}", f"mesh={text!r}", axis=name, size=size,
                                allowed=allowed)
    return sizes  # type: ignore[return-value]


def mesh_from_text(text: str) -> Mesh:
    """The mesh of a ``--mesh DxFxT`` setting over this process's devices (:func:`parse_mesh_shape`, then
    :func:`make_mesh`); every error names ``mesh=<text>``, the axis sizes as text (they are not flags)."""
    shape = parse_mesh_shape(text)
    try:
        return make_mesh(*shape)
    except ArgumentError as e:
        raise ArgumentError("{}: {problem}", f"mesh={text!r}", problem=str(e)) from None


def axis_sizes(mesh: MeshLike) -> dict[str, int]:
    """Axis name → size for a :class:`Mesh`, an :class:`AbstractMesh`, a mapping, or a ``(d, f, t)`` tuple."""
    if isinstance(mesh, (Mesh, AbstractMesh)):
        return dict(mesh.shape)
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    sizes = tuple(mesh)
    if len(sizes) != len(MESH_AXES) or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mesh shape {sizes!r}: expected ({', '.join(MESH_AXES)}) positive sizes")
    return dict(zip(MESH_AXES, sizes))


def mesh_shape(mesh: MeshLike) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes of a mesh (an axis it lacks counts as 1)."""
    sizes = axis_sizes(mesh)
    return tuple(sizes.get(name, 1) for name in MESH_AXES)  # type: ignore[return-value]
