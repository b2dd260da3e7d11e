"""Building blocks shared by the three towers: parameters with logical axes, einsum projections, norms,
and the per-piece CPU schedule of the two image towers.

Shape letters (one glossary for the whole package, used in einsum strings and docstrings):

    B batch            T query length         S key length (cache slots)
    D model width      N query heads          K key/value heads
    G query heads per K/V head (N = K·G)      H head dim
    F MLP width        V vocabulary           L layers
    P patches          Q resampler queries    C channels of a flattened patch (3·14·14)

Logical axis names live on every parameter (``nnx.Param(..., out_sharding=axes)``, not sharded eagerly);
``sharding/`` maps them to mesh axes. Names used: ``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``norm`` and the vision/resampler variants ``vision_*``/``resampler_*``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax import sharding

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    """An ``nnx.Param`` carrying its logical axes (resolved to a mesh later by ``sharding``)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def fan_in_normal(fan_in_axes: Sequence[int]) -> Initializer:
    """Normal init with std 1/sqrt(fan_in), fan-in over the given axes of the weight."""

    def init(key, shape, dtype):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        return jax.random.normal(key, shape, dtype) * (fan_in ** -0.5)

    return init


zeros: Initializer = lambda key, shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
ones: Initializer = lambda key, shape, dtype: jnp.ones(shape, dtype)  # noqa: E731
normal: Initializer = lambda key, shape, dtype: jax.random.normal(key, shape, dtype)  # noqa: E731


def batch_einsum(equation: str, x: jax.Array, kernel, product: Callable = jnp.einsum) -> jax.Array:
    """``product(equation, x, kernel)`` (``jnp.einsum``; ``qwix.einsum`` for a quantized kernel) with the
    leading axes that x and the result share and the kernel lacks (the batch-like ``B, T`` of
    ``"BTD,DF->BTF"``) merged into one for the product.

    Same maths, one batch-like axis: the kernel's gradient then contracts over one axis ``[B·T]`` instead of
    two, which XLA:CPU lowers to a plain matrix product of row-major operands; with ``B`` and ``T`` separate it
    contracts over ``(B, T)`` and writes a transposed copy of the activation gradient first (in the decoder's
    SwiGLU with the gate's derivative fused into that strided copy, and computed a second time, untransposed,
    for the input's gradient: forward + backward of the MLP 108 → 79 ms at ``benchmarks/train_cpu.py``'s
    shapes on 2 cores). Fewer than two such axes: the einsum as given.

    In a program traced without a mesh (one device) and with the plain ``jnp.einsum``, two or more contracted axes that end ``x`` and start
    the kernel in the same order (the attention output's ``NH`` of ``"BTNH,NHD->BTD"``) are merged into one
    as well: a free reshape of both. Left as they are, XLA:CPU copies the kernel into its preferred
    contraction order on every call: hoisted out of a compiled decode loop, not out of a decode step called
    from Python (the engine's), ≈ 3 MB per layer per step at the Qwen2-0.5B shape. On a mesh the merge is
    not made: where the rules split the minor axis (``head_dim`` when the heads do not divide ``tensor``)
    the merged axis has no sharding GSPMD can express, and it would all-gather the kernel on every call.
    """
    inputs, out = equation.replace(" ", "").split("->")
    x_axes, kernel_axes = inputs.split(",")
    contracted = "".join(c for c in kernel_axes if c in x_axes and c not in out)
    mesh = sharding.current_context().mesh
    if (len(contracted) >= 2 and x_axes.endswith(contracted) and kernel_axes.startswith(contracted)
            and "." not in equation and (mesh is None or mesh.size == 1) and product is jnp.einsum):
        k = len(contracted)
        merged = next(c for c in "MNOPQRSTUVWXYZABCDEFGHIJKL" if c not in equation)
        return batch_einsum(f"{x_axes[:-k]}{merged},{merged}{kernel_axes[k:]}->{out}",
                            x.reshape(x.shape[:-k] + (-1,)), kernel.reshape((-1,) + kernel.shape[k:]))
    lead = 0
    while (lead < min(len(x_axes), len(out)) and x_axes[lead] == out[lead] and x_axes[lead] not in kernel_axes
           and x_axes[lead] != "."):
        lead += 1
    if lead < 2:
        return product(equation, x, kernel)
    merged = next(c for c in "MNOPQRSTUVWXYZABCDEFGHIJKL" if c not in equation)
    flat = f"{merged}{x_axes[lead:]},{kernel_axes}->{merged}{out[lead:]}"
    y = product(flat, x.reshape((-1,) + x.shape[lead:]), kernel)
    return y.reshape(x.shape[:lead] + y.shape[1:])


class Einsum(nnx.Module):
    """``y = einsum(equation, x, kernel) (+ bias)``, computed in ``dtype``.

    ``equation`` names the kernel's axes, e.g. ``"BTD,DNH->BTNH"`` for a query projection; ``fan_in``
    gives the kernel axes contracted with the input (for initialisation only).
    """

    def __init__(self, equation: str, kernel_shape: Sequence[int], kernel_axes: Axes, *,
                 bias_shape: Sequence[int] | None = None, bias_axes: Axes | None = None,
                 fan_in: Sequence[int] = (0,), dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.equation = equation
        self.dtype = dtype
        self.kernel = param(rngs, fan_in_normal(fan_in), kernel_shape, kernel_axes, param_dtype)
        self.bias = (param(rngs, zeros, bias_shape, bias_axes, param_dtype)
                     if bias_shape is not None else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = batch_einsum(self.equation, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Qwen2 RMSNorm: normalise in float32, cast back to x's dtype, then scale (HF order)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Weight-only RMSNorm over the last axis (``weight`` has logical axis ``norm``)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (``scale``/``bias`` have logical axis ``axis``)."""

    def __init__(self, dim: int, eps: float, *, axis: str = "norm", param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), (axis,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def per_piece_on_cpu(fn, *args):
    """``fn(*args)`` for a batch of pieces: every leaf of ``args`` and of the result has the piece axis first.

    On CPU the pieces go through ``fn`` one per loop step (``fn`` sees a batch of one), so each piece's
    activations (5–18 MB for a 1024-patch piece at the SigLIP-so400m width, against 47–176 MB for a batch
    of 10) stay in cache between the products; this measured ≈ 20 % less CPU time per piece than the
    batched call (``benchmarks/vision_cpu.py``). Elsewhere one batched call. Chosen at lowering.
    """
    def loop(*xs):
        one = lambda a: jax.tree.map(lambda y: y[0], fn(*jax.tree.map(lambda y: y[None], a)))  # noqa: E731
        return jax.lax.map(one, xs)

    return jax.lax.platform_dependent(*args, cpu=loop, default=fn)
