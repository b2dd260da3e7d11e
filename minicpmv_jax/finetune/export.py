"""Export of a fine-tuned model as a folder that ``MiniCPMV.from_pretrained`` loads (the converter's format).

The folder is exactly what ``minicpmv-jax convert`` writes (:mod:`minicpmv_jax.orbax_checkpoint`): the
manifest, the base model's config / tokenizer / preprocessor / generation files, and ``params/``, an
Orbax tree of every parameter of :class:`~minicpmv_jax.model.MiniCPMVModel` in our layout. LoRA adapters are
merged first (``W += (alpha/r)·A·B`` in float32, on a copy: the model passed in keeps its adapters), so
the result is a plain model, loadable without this package's fine-tuning code.

A model over a quantized base (QLoRA: loaded with ``quantize="int8" | "int4"``) is written as a float
model: each adapter merged into its dequantized kernel (``kernel·scale + (alpha/r)·A·B``), every other
quantized projection dequantized, all in the scales' dtype (the load dtype) unless ``dtype`` says
otherwise. The manifest then has no ``quantization`` record, so ``from_pretrained`` loads the folder as the
plain float checkpoint it is.

Writing is atomic, with the folder helpers the converter uses too (:mod:`minicpmv_jax.checkpoint_folder`:
``check_destination`` / ``staged``): the folder is built beside ``dst`` and renamed into place at the end; a
failure leaves ``dst`` as it was. Parameters are written with the converter's Orbax settings
(``orbax_checkpoint.write_params``) from wherever they live (sharded arrays: each process writes its
shards), then checked against the model before the rename.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.checkpoint_folder import check_destination, copy_aux_files, staged
from minicpmv_jax.dtypes import as_dtype
from minicpmv_jax.hub import resolve_model

from .lora import lora_modules, merge_lora
from .train_state import model_quantization

__all__ = ["export_model", "merged_copy"]


def merged_copy(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` (arrays shared) with every LoRA adapter folded into its kernel and every quantized
    projection dequantized (:func:`~minicpmv_jax.finetune.lora.merge_lora`): a float model."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)
    return merge_lora(copy) if lora_modules(copy) or model_quantization(copy) is not None else copy


def export_model(model: nnx.Module, dst: str | os.PathLike, *, base_model: str | os.PathLike, dtype: Any = None,
                 overwrite: bool = False, info: Mapping[str, Any] | None = None) -> str:
    """Writes ``model`` (adapters merged; a quantized base dequantized, see the module doc) to ``dst`` as a
    converted folder; returns ``dst``.

    Args:
      model: a :class:`~minicpmv_jax.model.MiniCPMVModel`, e.g. ``Trainer.model(state)``.
      dst: the new folder. An existing one is replaced only with ``overwrite``, and only if this package
        wrote it (as for ``minicpmv-jax convert``).
      base_model: what the model was loaded from (a folder, ``~`` expanded, ``"demo"`` or a Hub id, as
        for ``from_pretrained``): its config, tokenizer and preprocessor files are copied.
      dtype: store every parameter in this dtype (``"bfloat16"``, ...); default: as they are in ``model``
        (float32 for trained parameters, the load dtype for frozen ones).
      info: JSON-able facts recorded in the manifest under ``"finetune"`` (e.g. the TrainConfig and step).
    """
    dst = os.path.normpath(os.fspath(dst))
    base = resolve_model(base_model)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise FileNotFoundError(f"{base}: no config.json (base_model must be the folder the model was loaded from)")
    check_destination(dst, base, overwrite)
    model = merged_copy(model)
    target = None if dtype is None else as_dtype(dtype)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    arrays = {ock.tree_key(path): var.get_value() if target is None else var.get_value().astype(target)
              for path, var in flat}
    with staged(dst, overwrite) as tmp:
        ock.write_params(os.path.join(tmp, ock.PARAMS_DIR), ock.nest(arrays))
        copied = copy_aux_files(base, tmp)
        _write_manifest(tmp, base, arrays, copied, None if target is None else target.name, info)
        ock.check_params(tmp, model)        # every parameter of the model, with its shape, before the rename
    return dst


def _write_manifest(folder: str, base: str, arrays: Mapping[tuple, jax.Array], copied: list[str],
                    requested: str | None, info: Mapping[str, Any] | None) -> None:
    ock.write_manifest(
        folder,
        source={"location": base, "folder": os.path.abspath(base), "exported_from": "fine-tuning"},
        dtype={"requested": requested,
               "stored": dict(collections.Counter(np.dtype(a.dtype).name for a in arrays.values()))},
        params={"folder": ock.PARAMS_DIR, "arrays": len(arrays),
                "parameters": int(sum(a.size for a in arrays.values())),
                "bytes": int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays.values()))},
        copied_files=copied,
        finetune=dict(info or {}),
    )
