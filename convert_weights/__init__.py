"""Conversion of PyTorch safetensors checkpoints (HF layout) to a converted folder with Orbax parameters.

Driven by the same name table as the loader (:mod:`minicpmv_jax.checkpoint_names`) and the same
header-first reader (:class:`minicpmv_jax.hf_checkpoint.HFCheckpoint`); the folder's layout is described in
:mod:`minicpmv_jax.orbax_checkpoint`, which also loads it (``MiniCPMV.from_pretrained`` detects it)::

    from minicpmv_jax.convert_weights import convert
    convert("MiniCPM-V-2_6/", "minicpmv-orbax/", dtype="bfloat16")   # or `minicpmv-jax convert SRC DST`
    convert("MiniCPM-V-2_6/", "minicpmv-int4/", dtype="bfloat16", quantize="int4")   # ... --quantize int4

The folder helpers it writes with live in :mod:`minicpmv_jax.checkpoint_folder`, shared with the other
writer of converted folders (``minicpmv_jax.finetune.export_model``): :func:`check_destination` (refuse a
destination before any work), :func:`staged` (build the folder beside it, rename it into place at the end)
and :func:`copy_aux_files` (config, tokenizer, preprocessor files); the first two are re-exported here
raising :class:`ConvertError`. The parameters are written with
:func:`minicpmv_jax.orbax_checkpoint.write_params`.
"""

from minicpmv_jax.checkpoint_folder import copy_aux_files

from ._convert import ConversionResult, convert
from ._errors import ConvertError
from ._output import check_destination, staged
from ._source import resolve_source

__all__ = ["ConversionResult", "ConvertError", "check_destination", "convert", "copy_aux_files", "resolve_source",
           "staged"]
