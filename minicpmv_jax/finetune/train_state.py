"""The train state and the split of a model into what is trained and what is frozen.

:class:`TrainState` is everything a step changes — and all a checkpoint needs besides the frozen base:
the step number, the trainable parameters (float32 master copies), the optimizer state and the RNG key.
It is a plain pytree of arrays: the parameters are nested dicts keyed by their NNX path components as
strings (``params["llm"]["layers"]["0"]["attn"]["q"]["lora_a"]``, the layout of the converter's Orbax
trees, :mod:`minicpmv_jax.orbax_checkpoint`), so Orbax saves and restores it as is.

The model itself is split once (:func:`split_model`) into a static graph definition, the trainable
parameters (:func:`trainable_filter`: LoRA adapters, or the whole LLM, plus the vision encoder and the
resampler when the config says so), the frozen parameters and the rest (LoRA dropout RNG streams).
The train step merges them back inside jit; only the trainable part gets gradients and optimizer state.

A model loaded with ``quantize="int8" | "int4"`` (:mod:`minicpmv_jax.quantization`) holds its language
model's projections as integer kernels with float scales. They are frozen base weights: LoRA over them
(QLoRA) trains float32 adapters, and the integers sit in the frozen part, never differentiated and with no
optimizer state. Full fine-tuning of such a model is refused (:func:`prepare_model`), and a split whose
trainable part holds anything but floats is an error (:func:`split_model`): ``jax.grad`` is never asked to
differentiate an integer array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.dtypes import as_dtype
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.quantization import QuantizationConfig, QuantizedEinsum

from .config import TrainConfig
from .lora import LoRAParam, apply_lora

__all__ = ["TrainState", "trainable_filter", "prepare_model", "set_compute_dtype", "split_model", "params_tree",
           "params_state", "describe_trainable", "model_quantization", "quantize_setting"]

Path = tuple[str | int, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What one train step reads and returns (donated): a pytree of arrays.

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: the trainable parameters, float32, nested dicts of path components (see the module doc).
      opt_state: the optax state for ``params`` (float32 moments of the same layout, counters).
      rng: uint32 ``[2]`` raw key data (``jax.random.key_data``); each step folds in its step number.
    """

    step: Any
    params: Any
    opt_state: Any
    rng: Any


def trainable_filter(config: TrainConfig) -> Callable[[Path, Any], bool]:
    """An NNX filter ``(path, variable) → bool`` selecting the parameters ``config`` trains.

    LoRA: the adapters (:class:`LoRAParam`); full fine-tuning: every ``llm/`` parameter. Plus all of
    ``vpm/`` with ``train_vision`` and all of ``resampler/`` with ``train_resampler``.
    """
    towers = tuple(t for t, on in (("vpm", config.train_vision), ("resampler", config.train_resampler)) if on)
    if config.lora is None:
        towers = ("llm",) + towers

    def selected(path: Path, value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        return isinstance(value, LoRAParam) or (bool(path) and path[0] in towers)

    return selected


def set_compute_dtype(model: nnx.Module, dtype: Any) -> None:
    """Sets the computation dtype of every submodule that has one (``.dtype``: the towers, einsums,
    embedder), in place. Parameters keep their storage dtype; each product casts them."""
    dtype = as_dtype(dtype, "compute_dtype")
    for _, module in nnx.iter_modules(model):
        if "dtype" in vars(module):
            module.dtype = dtype


def model_quantization(model: nnx.Module) -> QuantizationConfig | None:
    """The weight-only quantization of ``model``'s projections (that of its ``QuantizedEinsum`` modules, as
    ``from_pretrained(..., quantize=)`` made them; adapters included), or None for a float model."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, QuantizedEinsum):
            return module.quantization
    return None


def quantize_setting(quantization: QuantizationConfig | None) -> str | dict | None:
    """A quantization as the ``quantize`` setting spells it, for records and messages: None, ``"int8"`` /
    ``"int4"`` (the scheme with its default settings), else the whole record (``QuantizationConfig.to_json``)."""
    if quantization is None:
        return None
    return quantization.mode if quantization == QuantizationConfig(quantization.mode) else quantization.to_json()


def prepare_model(model: nnx.Module, config: TrainConfig) -> list[str]:
    """Readies a loaded :class:`~minicpmv_jax.model.MiniCPMVModel` for training ``config``, in place:
    adds the LoRA adapters (when ``config.lora``; A drawn from ``config.seed``), sets the computation
    dtype and per-layer rematerialisation. Returns the paths of the modules that got adapters.

    Raises :class:`~minicpmv_jax.errors.ArgumentError` (naming ``TrainConfig.lora`` and ``quantize``) for full
    fine-tuning of a quantized model, before changing anything."""
    quantization = model_quantization(model)
    if config.lora is None and quantization is not None:
        raise ArgumentError("{} (full fine-tuning) trains the language model's weights, but the model was loaded "
                            "with {}: its projections are integers, which cannot be trained. Train LoRA adapters "
                            "over them instead (QLoRA: set {}), or load the model without quantize",
                            "TrainConfig.lora=None", f"quantize={quantize_setting(quantization)!r}",
                            "TrainConfig.lora")
    wrapped = [] if config.lora is None else apply_lora(model, config.lora, seed=config.seed)
    set_compute_dtype(model, config.compute_dtype)
    model.llm.remat = config.remat
    return wrapped


def split_model(model: nnx.Module, config: TrainConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen, rest)``: the trainable and frozen parameters and every other
    variable (RNG streams). Raises ``ValueError`` when ``config`` selects no parameter, or one that is not
    a float (an integer kernel of a quantized model)."""
    graphdef, trainable, frozen, rest = nnx.split(model, trainable_filter(config), nnx.Param, ...)
    flat = nnx.to_flat_state(trainable)
    if not flat:
        raise ValueError("the TrainConfig trains no parameter (no LoRA adapter, no tower selected)")
    integers = [ock.show(ock.tree_key(path)) for path, var in flat
                if not jnp.issubdtype(var.get_value().dtype, jnp.inexact)]
    if integers:
        raise ValueError(f"the TrainConfig trains {len(integers)} parameters that are not floats (e.g. "
                         f"{integers[0]}: quantized weights), which cannot be trained; train LoRA adapters "
                         "over them (QLoRA) or load the model without quantize")
    return graphdef, trainable, frozen, rest


def params_tree(state: nnx.State, dtype: Any = None) -> dict:
    """An NNX parameter state → nested dicts of its arrays keyed by string path components (optionally cast)."""
    return ock.nest({ock.tree_key(path): var.get_value() if dtype is None else var.get_value().astype(dtype)
                     for path, var in nnx.to_flat_state(state)})


def params_state(tree: dict, paths: list[Path]) -> nnx.State:
    """Inverse of :func:`params_tree` for the parameters at ``paths`` (the NNX paths, with int list
    indices): an ``nnx.State`` of raw arrays that ``nnx.merge`` accepts."""
    flat = dict(ock.flatten(tree))
    try:
        return nnx.from_flat_state([(path, flat[ock.tree_key(path)]) for path in paths])
    except KeyError as e:
        raise ValueError(f"trainable parameters: {ock.show(e.args[0])} is missing from the tree") from None


def describe_trainable(params: dict) -> str:
    """``"N tensors, M parameters in llm, resampler"`` for a trainable tree (``TrainState.params``), for logs."""
    flat = list(ock.flatten(params))
    count = sum(int(jnp.size(value)) for _, value in flat)
    towers = sorted({key[0] for key, _ in flat})
    return f"{len(flat)} tensors, {count:,} parameters in {', '.join(towers)}"
