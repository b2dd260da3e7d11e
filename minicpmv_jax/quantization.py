"""Weight-only quantization of the language model's projections: int8 per output channel, int4 in groups.

The numerics are Qwix's (``qwix.quantize``: symmetric absmax scales, round to nearest; ``qwix.einsum``: the
product with a quantized operand); this module decides *what* is quantized and *how* it is laid out, and
holds the result as parameters with logical axes like every other layer.

A projection ``y = einsum(eq, x, W)`` with ``W`` float becomes ``y = einsum(eq, x, dequant(kernel, scale))``
with ``kernel`` an integer array of ``W``'s shape and ``scale`` float:

* **int8** — one scale per output channel: ``scale`` has ``W``'s output axes, its contracted axes are 1.
  ``q "BTD,DNH->BTNH"``: kernel int8 ``[D, N, H]``, scale ``[1, N, H]``.
* **int4** — one scale per output channel and per group of ``group_size`` (default 128) consecutive inputs:
  the last contracted axis is cut into groups, any other contracted axis keeps a scale per entry. So a
  group is ``group_size`` consecutive elements of the flattened input whatever the equation:
  ``down "BTF,FD->BTD"``: kernel int4 ``[F, D]``, scale ``[F/128, D]``; ``o "BTNH,NHD->BTD"``: kernel
  ``[N, H, D]``, scale ``[N, H/128, D]``. Where the last contracted axis is shorter than ``group_size``
  (a head dim of 64), a group is that whole axis; where ``group_size`` does not divide it, a group is its
  largest divisor below ``group_size`` (smaller groups, more scales, never fewer).

The scale's axes carry the kernel's logical axis names where they have more than one entry (``None`` where
they were reduced to 1), and the scale is placed like its kernel (``follows="kernel"``, see
:func:`minicpmv_jax.sharding.flat_param_specs`): split with its output channels, and its groups with the
kernel's input axis where that divides; never over a mesh axis its kernel does not use.

Covered: the decoder's q/k/v/o and gate/up/down in every layer; ``lm_head`` optionally
(:class:`QuantizationConfig`). The token embedding, the norms, the biases, the vision tower and the
resampler stay in the load dtype.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from minicpmv_jax import sharding
from minicpmv_jax.errors import ArgumentError

from .layers import Axes, Einsum, batch_einsum, fan_in_normal, param, zeros

__all__ = ["MODES", "QuantizationConfig", "QuantizedEinsum", "quantize_kernel", "scale_layout",
           "as_quantization", "quantize_projections", "PROJECTION_NAMES"]

#: The decoder projections quantization covers, by their module path inside a decoder layer.
PROJECTION_NAMES = (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"),
                    ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))

#: The schemes: ``"int8"`` (per output channel) and ``"int4"`` (per output channel and input group).
MODES = ("int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """Which projections of the language model are quantized, and how.

    Attributes:
      mode: ``"int8"`` (one scale per output channel) or ``"int4"`` (one per output channel and group).
      group_size: int4's group of consecutive inputs sharing a scale (default 128); ignored for int8.
      lm_head: quantize the output projection too (default False: it stays in the load dtype).
    """

    mode: str
    group_size: int = 128
    lm_head: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ArgumentError("{} must be one of {modes}, got {value!r}", "quantize", modes=MODES, value=self.mode)
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ArgumentError("{} must be a positive int, got {value!r}", "group_size", value=self.group_size)

    @property
    def qtype(self):
        """The integer dtype of the kernels (``jnp.int8`` / ``jnp.int4``)."""
        return QTYPES[self.mode]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record (a converted folder's manifest keeps it; :meth:`from_json` reads it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "quantization") -> "QuantizationConfig":
        unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
        if unknown or "mode" not in record:
            raise ValueError(f"{where}: not a quantization record ({json.dumps(record)}): "
                             + (f"unknown fields {unknown}" if unknown else "no 'mode'"))
        return cls(**record)


def as_quantization(value: "str | QuantizationConfig | None") -> QuantizationConfig | None:
    """``None`` / ``"none"`` → None; ``"int8"`` / ``"int4"`` → their default config; a config as it is."""
    if value is None or isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        return None if value.lower() in ("none", "") else QuantizationConfig(value.lower())
    raise ArgumentError("{} must be 'int8', 'int4', a QuantizationConfig or None, got {kind}", "quantize",
                        kind=type(value).__name__)


# --------------------------------------------------------------------------- the layout (pure)


def _contracted(equation: str) -> tuple[list[int], list[int]]:
    """(contracted, output) axis indices of the kernel of ``equation`` ("x,kernel->out")."""
    inputs, out = equation.replace(" ", "").split("->")
    x_axes, kernel_axes = inputs.split(",")
    contracted = [i for i, c in enumerate(kernel_axes) if c in x_axes and c not in out]
    return contracted, [i for i in range(len(kernel_axes)) if i not in contracted]


def scale_layout(equation: str, kernel_shape: Sequence[int], config: QuantizationConfig
                 ) -> tuple[tuple[int, ...], dict[int, int]]:
    """(channelwise axes, tiled axes {axis: tile}) of a kernel for ``qwix.quantize`` (see the module doc).

    int4's tile is the largest divisor of the last contracted axis that is at most ``group_size`` (the
    axis itself when shorter): a group never straddles two rows of the kernel, and is never larger than
    asked. Every axis of the real model and of the Qwen2-0.5B shape is a multiple of 128."""
    contracted, outputs = _contracted(equation)
    if not contracted:
        raise ValueError(f"{equation}: the kernel has no contracted axis to quantize over")
    if config.mode == "int8":
        return tuple(outputs), {}
    last = contracted[-1]
    size = kernel_shape[last]
    tile = max(t for t in range(1, min(config.group_size, size) + 1) if size % t == 0)
    return tuple(sorted(outputs + contracted[:-1])), {last: tile}


def scale_shape(equation: str, kernel_shape: Sequence[int], config: QuantizationConfig) -> tuple[int, ...]:
    """The shape of a kernel's scale: its size over each axis's tile (1 over a reduced axis)."""
    channelwise, tiled = scale_layout(equation, kernel_shape, config)
    return tuple(n if i in channelwise else n // tiled[i] if i in tiled else 1 for i, n in enumerate(kernel_shape))


def quantize_kernel(kernel: jax.Array | np.ndarray, equation: str, config: QuantizationConfig, *,
                    scale_dtype=None) -> tuple[jax.Array, jax.Array]:
    """A float kernel → (integer kernel of the same shape, float scale ``scale_shape``), by ``qwix.quantize``
    (absmax, symmetric). ``scale_dtype`` defaults to the kernel's dtype; quantization itself runs in
    float32 whatever the kernel's dtype."""
    kernel = jnp.asarray(kernel)
    scale_dtype = scale_dtype or kernel.dtype
    channelwise, tiled = scale_layout(equation, kernel.shape, config)
    q = _quantize(kernel.astype(jnp.float32), config.qtype, channelwise, tuple(sorted(tiled.items())))
    return q.qvalue, q.scale.astype(scale_dtype)


@jax.jit(static_argnums=(1, 2, 3))
def _quantize(kernel: jax.Array, qtype, channelwise: tuple[int, ...], tiled: tuple[tuple[int, int], ...]):
    return qwix.quantize(kernel, qtype, channelwise_axes=channelwise, tiled_axes=dict(tiled))


def dequantize(kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """``kernel · scale`` (broadcast per tile), in the scale's dtype."""
    return qwix.dequantize(qwix.QArray(qvalue=kernel, scale=scale))


# --------------------------------------------------------------------------- the module


class QuantizedEinsum(nnx.Module):
    """``y = einsum(equation, x, kernel · scale) (+ bias)`` with an integer ``kernel`` (weight-only).

    Built like :class:`~minicpmv_jax.layers.Einsum` (same equation, shape and logical axes; the random
    initial kernel is quantized) or from a float one (:meth:`from_float`). Parameters: ``kernel`` (int8 /
    int4, the float kernel's shape and axes), ``scale`` (``param_dtype``, :func:`scale_shape`), ``bias``
    (float, as in ``Einsum``). The product is ``qwix.einsum`` in the computation ``dtype``.
    """

    def __init__(self, equation: str, kernel_shape: Sequence[int], kernel_axes: Axes, *,
                 quantization: QuantizationConfig, bias_shape: Sequence[int] | None = None,
                 bias_axes: Axes | None = None, fan_in: Sequence[int] = (0,), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None, kernel: jax.Array | None = None,
                 bias: nnx.Param | None = None):
        """``kernel`` (float, ``kernel_shape``) and ``bias`` (a parameter) are given by :meth:`from_float`;
        otherwise the kernel is drawn as ``Einsum`` draws it and the bias is zero."""
        self.equation = equation
        self.dtype = dtype
        self.quantization = quantization
        if kernel is None:
            kernel = fan_in_normal(fan_in)(rngs.params(), tuple(kernel_shape), jnp.float32)
        if bias is None and bias_shape is not None:
            bias = param(rngs, zeros, bias_shape, bias_axes, param_dtype)
        qvalue, scale = quantize_kernel(kernel, equation, quantization, scale_dtype=param_dtype)
        kernel_axes = tuple(kernel_axes)
        scale_axes = tuple(a if n > 1 else None for a, n in zip(kernel_axes, scale.shape))
        self.kernel = nnx.Param(qvalue, out_sharding=kernel_axes, eager_sharding=False)
        # placed like its kernel (sharding.flat_param_specs): split with the kernel's columns, not resolved
        # on its own, where the rules' divisibility fall-back could pick another mesh axis
        self.scale = nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False, follows="kernel")
        self.bias = bias

    @classmethod
    def from_float(cls, einsum, quantization: QuantizationConfig) -> "QuantizedEinsum":
        """A quantized copy of a :class:`~minicpmv_jax.layers.Einsum` (its kernel quantized, its bias kept)."""
        kernel = einsum.kernel
        value = kernel.get_value()
        return cls(einsum.equation, value.shape, sharding.logical_axes_of(kernel), quantization=quantization,
                   dtype=einsum.dtype, param_dtype=value.dtype, kernel=value, bias=einsum.bias)

    def set_from_float(self, kernel: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(kernel, scale) values quantized from a float kernel of this layer's shape (for loaders)."""
        return quantize_kernel(kernel, self.equation, self.quantization, scale_dtype=self.scale.get_value().dtype)

    def dequantized(self) -> jax.Array:
        """The float kernel this layer computes with, in the scale's dtype."""
        return dequantize(self.kernel[...], self.scale[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        w = qwix.QArray(qvalue=self.kernel[...], scale=self.scale[...].astype(self.dtype))
        y = batch_einsum(self.equation, x.astype(self.dtype), w, product=qwix.einsum)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def quantize_projections(model: nnx.Module, quantization: "str | QuantizationConfig") -> list[str]:
    """Quantizes, in place, the projections of a model already in memory (a ``MiniCPMVModel`` or a bare
    ``Qwen2``): every float ``Einsum`` at ``layers[i].attn.{q,k,v,o}`` / ``layers[i].mlp.{gate,up,down}`` of
    the language model (and ``lm_head`` when ``quantization.lm_head``) becomes a :class:`QuantizedEinsum`
    of the same kernel, placed on the same devices. The same values as loading with ``quantize=``;
    prefer that for a checkpoint, since this holds the float kernels first. Returns the replaced paths.
    """
    config = as_quantization(quantization)
    if config is None:
        raise ArgumentError("{} must be 'int8', 'int4' or a QuantizationConfig", "quantization")
    llm = getattr(model, "llm", model)
    targets = [(f"layers.{i}.{part}.{name}", getattr(layer, part), name)
               for i, layer in enumerate(llm.layers) for part, name in PROJECTION_NAMES]
    if config.lm_head:
        targets.append(("lm_head", llm, "lm_head"))
    replaced = []
    for path, parent, name in targets:
        dense = getattr(parent, name)
        if not isinstance(dense, Einsum):
            continue
        quantized = QuantizedEinsum.from_float(dense, config)
        placed = dense.kernel.get_value().sharding
        if isinstance(placed, jax.sharding.NamedSharding):      # on a mesh: the scale follows its kernel
            kernel, scale = quantized.kernel, quantized.scale
            kernel.set_value(jax.device_put(kernel.get_value(), placed))
            spec = sharding.follow_spec(placed.spec, scale.get_value().shape, placed.mesh)
            scale.set_value(jax.device_put(scale.get_value(), jax.sharding.NamedSharding(placed.mesh, spec)))
        setattr(parent, name, quantized)
        replaced.append(path)
    if hasattr(model, "quantization"):
        model.quantization = config
    return replaced
