"""LoRA: low-rank adapters on the model's einsum projections, and folding them back into the kernels.

A targeted :class:`~minicpmv_jax.layers.Einsum` ``y = einsum(eq, x, W)`` is wrapped by :class:`LoRAEinsum`::

    y = base(x) + (alpha / r) · B(A(dropout(x)))

The adapter shapes follow the base equation. W's axes split into those contracted with the input (``In``)
and those that appear in the output (``Out``); A is ``[In..., r]`` and B is ``[r, Out...]``:

    q   "BTD,DNH->BTNH"   W [D, N, H]   A [D, r]      B [r, N, H]
    o   "BTNH,NHD->BTD"   W [N, H, D]   A [N, H, r]   B [r, D]

so that ``A·B`` has W's shape and :func:`merge_lora` is ``W += (alpha/r)·A·B``. A and B are
:class:`LoRAParam` (a subclass of ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` and the sharding
helpers see them) with logical axes: W's input axes + ``"lora_rank"`` for A, ``"lora_rank"`` + W's output
axes for B — they shard like their kernel, the rank replicated. A starts as PEFT does (kaiming-uniform,
``U(±1/sqrt(fan_in))``), B at zero, so a fresh adapter changes nothing. Adapters are float32 whatever the
base's dtype; the branch is computed in the base's computation dtype.

**QLoRA.** The base may be a :class:`~minicpmv_jax.quantization.QuantizedEinsum` (a model loaded with
``from_pretrained(..., quantize="int8" | "int4")``): the frozen product is then the quantized one
(integer kernel × scale), and the adapters are the same float32 A and B, shaped after the integer kernel
(which has the float kernel's shape and axes). The integers are never trained. :func:`merge_lora` folds an
adapter into the *dequantized* kernel, ``W = kernel·scale + (alpha/r)·A·B``, and puts a plain float
``Einsum`` in its place; it turns every other quantized projection into a float ``Einsum`` of its
dequantized kernel too, so that a merged model is always a float model (what the export writes).

Dropout is an ``nnx.Dropout`` per adapter, off (deterministic) unless :func:`set_lora_dropout` enables it;
the train step does that and reseeds every adapter's stream from its own key (:func:`reseed_lora_dropout`).

Shape letters as in ``minicpmv_jax/layers.py``; ``r`` is the rank.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax import sharding
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.layers import Einsum, batch_einsum
from minicpmv_jax.quantization import QuantizedEinsum

from .config import LoRAConfig, first_match, path_name

__all__ = ["LoRAParam", "LoRAEinsum", "PROJECTIONS", "lora_equations", "apply_lora", "merge_lora", "lora_modules",
           "dequantize_projections", "set_lora_dropout", "reseed_lora_dropout"]

_RANK = "r"

#: The projections an adapter can wrap: a float ``Einsum`` or a weight-only ``QuantizedEinsum`` (QLoRA).
PROJECTIONS = (Einsum, QuantizedEinsum)


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (A or B): trainable where the base weights are frozen."""


def lora_equations(equation: str) -> tuple[str, str, str, tuple[int, ...], tuple[int, ...]]:
    """The einsums of a LoRA branch for a base einsum ``"<x>,<W>-><y>"``.

    Returns ``(eq_a, eq_b, eq_merge, in_axes, out_axes)``: ``eq_a`` maps x and A ``[In..., r]`` to
    ``[..., r]``; ``eq_b`` maps that and B ``[r, Out...]`` to y; ``eq_merge`` maps A and B to W's layout;
    ``in_axes`` / ``out_axes`` are the positions in W of the contracted and the output axes.

    >>> lora_equations("BTD,DNH->BTNH")[:3]
    ('BTD,Dr->BTr', 'BTr,rNH->BTNH', 'Dr,rNH->DNH')
    """
    try:
        inputs, y = equation.replace(" ", "").split("->")
        x, w = inputs.split(",")
    except ValueError:
        raise ValueError(f"einsum equation {equation!r}: expected '<input>,<kernel>-><output>'") from None
    if _RANK in equation:
        raise ValueError(f"einsum equation {equation!r} already uses the letter {_RANK!r} (LoRA's rank)")
    contracted = "".join(c for c in w if c in x and c not in y)
    out = "".join(c for c in w if c in y and c not in x)
    rest = "".join(c for c in x if c not in contracted)
    if not contracted or not out or len(contracted) + len(out) != len(w) or sorted(rest + out) != sorted(y):
        raise ValueError(f"einsum equation {equation!r}: LoRA needs a projection whose kernel axes are each "
                         "either contracted with the input or kept in the output")
    eq_a = f"{x},{contracted}{_RANK}->{rest}{_RANK}"
    eq_b = f"{rest}{_RANK},{_RANK}{out}->{y}"
    eq_merge = f"{contracted}{_RANK},{_RANK}{out}->{w}"
    return eq_a, eq_b, eq_merge, tuple(w.index(c) for c in contracted), tuple(w.index(c) for c in out)


def _kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PEFT's A init: ``kaiming_uniform_(a=sqrt(5))`` on ``[r, fan_in]`` is ``U(±1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoRAEinsum(nnx.Module):
    """``base(x) + scale · B(A(dropout(x)))`` around a frozen :class:`~minicpmv_jax.layers.Einsum` or
    :class:`~minicpmv_jax.quantization.QuantizedEinsum` (QLoRA: the adapters float32, the base's product
    the quantized one)."""

    def __init__(self, base: Einsum | QuantizedEinsum, rank: int, alpha: float, dropout: float = 0.0, *,
                 rngs: nnx.Rngs):
        if not isinstance(base, PROJECTIONS):
            raise TypeError(f"LoRAEinsum wraps an Einsum or a QuantizedEinsum, got {type(base).__name__}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.eq_a, self.eq_b, self.eq_merge, in_axes, out_axes = lora_equations(base.equation)
        kernel = base.kernel
        shape = tuple(kernel.get_value().shape)
        axes = sharding.logical_axes_of(kernel)
        a_shape = tuple(shape[i] for i in in_axes) + (rank,)
        b_shape = (rank,) + tuple(shape[i] for i in out_axes)
        fan_in = math.prod(shape[i] for i in in_axes)
        self.lora_a = LoRAParam(_kaiming_uniform(rngs.params(), a_shape, fan_in),
                                out_sharding=tuple(axes[i] for i in in_axes) + ("lora_rank",), eager_sharding=False)
        self.lora_b = LoRAParam(jnp.zeros(b_shape, jnp.float32),
                                out_sharding=("lora_rank",) + tuple(axes[i] for i in out_axes), eager_sharding=False)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x if self.dropout is None else self.dropout(x)
        dtype = self.base.dtype
        z = batch_einsum(self.eq_a, h.astype(dtype), self.lora_a[...].astype(dtype))
        z = batch_einsum(self.eq_b, z, self.lora_b[...].astype(dtype))
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> jax.Array:
        """``scale · A·B`` in the kernel's layout, float32."""
        ab = jnp.einsum(self.eq_merge, self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
        return self.scale * ab


# --------------------------------------------------------------------------- whole-model surgery


def _set_child(model: nnx.Module, path: tuple, child: nnx.Module) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def lora_modules(model: nnx.Module) -> list[tuple[tuple, LoRAEinsum]]:
    """Every adapter of ``model`` with its path, in graph order."""
    return [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, LoRAEinsum)]


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> list[str]:
    """Wraps every ``Einsum`` or ``QuantizedEinsum`` whose module path ``config.target_modules`` selects, in
    place.

    ``rngs`` (default: ``params`` stream ``seed``, ``dropout`` stream ``seed + 1``) draws A and the
    dropout streams. Returns the wrapped module
    paths. Raises ``ValueError`` when nothing matches (a typo must not train nothing) or when the model
    already has adapters.
    """
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora them first)")
    rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
    targets = [(tuple(path), m) for path, m in nnx.iter_modules(model)
               if isinstance(m, PROJECTIONS) and first_match(config.target_modules, path_name(path))]
    if not targets:
        einsums = [path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, PROJECTIONS)]
        raise ArgumentError("{} {targets} match no Einsum module; module paths look like {examples}",
                            "LoRAConfig.target_modules", targets=" ".join(config.target_modules), examples=einsums[:4])
    for path, base in targets:
        _set_child(model, path, LoRAEinsum(base, config.rank, config.alpha, config.dropout, rngs=rngs))
    return [path_name(p) for p, _ in targets]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (``W += scale·A·B`` in float32, cast to W's dtype) and puts the
    plain ``Einsum`` back in its place, in place; returns ``model``. A sharded kernel keeps its sharding.

    Over a quantized base (QLoRA) ``W`` is the dequantized kernel (``kernel·scale``, in the scale's dtype,
    i.e. the dtype the model was loaded in) and a new float ``Einsum`` takes the ``QuantizedEinsum``'s place;
    then every projection of the model that is still quantized becomes a float ``Einsum`` of its
    dequantized kernel (:func:`dequantize_projections`): the result is a float model."""
    for path, m in lora_modules(model):
        base = m.base
        if isinstance(base, QuantizedEinsum):
            w = base.dequantized()
            merged = _placed_like(base.kernel, (w.astype(jnp.float32) + m.delta()).astype(w.dtype))
            _set_child(model, path, _float_einsum(base, merged))
            continue
        kernel = base.kernel
        w = kernel.get_value()
        kernel.set_value(_placed_like(kernel, (w.astype(jnp.float32) + m.delta()).astype(w.dtype)))
        _set_child(model, path, base)
    dequantize_projections(model)
    return model


def dequantize_projections(model: nnx.Module) -> list[str]:
    """Replaces every :class:`~minicpmv_jax.quantization.QuantizedEinsum` of ``model`` by a float ``Einsum``
    of its dequantized kernel (``kernel·scale``, in the scale's dtype; placed like the integer kernel), in
    place, and clears ``model.quantization`` where the model has one. Returns the replaced module paths."""
    replaced = [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, QuantizedEinsum)]
    for path, m in replaced:
        _set_child(model, path, _float_einsum(m, _placed_like(m.kernel, m.dequantized())))
    if getattr(model, "quantization", None) is not None:     # MiniCPMVModel's record: no quantized projection is left
        model.quantization = None
    return [path_name(p) for p, _ in replaced]


def _placed_like(kernel: nnx.Variable, value: jax.Array) -> jax.Array:
    """``value`` on the devices and sharding of ``kernel``'s array (same shape; unchanged when it has none)."""
    current = kernel.get_value()
    if isinstance(current, jax.Array) and not isinstance(current, jax.core.Tracer):
        return jax.device_put(value, current.sharding)
    return value


def _float_einsum(quantized: QuantizedEinsum, kernel: jax.Array) -> Einsum:
    """A float ``Einsum`` with ``quantized``'s equation, computation dtype, logical axes and bias, and the
    float ``kernel`` (built abstractly: no random kernel is drawn)."""
    axes = sharding.logical_axes_of(quantized.kernel)
    bias = quantized.bias
    bias_shape, bias_axes = (None, None) if bias is None else (bias.get_value().shape, sharding.logical_axes_of(bias))
    einsum = nnx.eval_shape(lambda: Einsum(quantized.equation, kernel.shape, axes, bias_shape=bias_shape,
                                           bias_axes=bias_axes, dtype=quantized.dtype, param_dtype=kernel.dtype,
                                           rngs=nnx.Rngs(0)))
    einsum.kernel = nnx.Param(kernel, out_sharding=axes, eager_sharding=False)
    if bias is not None:
        einsum.bias = bias
    return einsum


def set_lora_dropout(model: nnx.Module, enabled: bool) -> None:
    """Turns the adapters' dropout on (training) or off (evaluation, inference; the default)."""
    for _, m in lora_modules(model):
        if m.dropout is not None:
            m.dropout.deterministic = not enabled


def _per_stream_key(path: tuple, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A distinct key per dropout stream: ``key`` with a stable hash of the stream's path folded in."""
    del shape
    return jax.random.fold_in(key, zlib.crc32(path_name(path).encode()) & 0x7FFFFFFF)


def reseed_lora_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Sets every adapter's dropout stream from ``key`` (each stream its own fold-in), so a step's masks
    depend only on the step's key: the same after a resume, different between adapters."""
    nnx.reseed(model, dropout=key, policy=_per_stream_key)
