"""Conversion of PyTorch safetensors checkpoints (HF layout) to a converted folder with Orbax parameters.

Driven by the same name table as the loader (:mod:`minicpmv_jax.checkpoint_names`) and the same
header-first reader (:class:`minicpmv_jax.hf_checkpoint.HFCheckpoint`); the folder's layout is described in
:mod:`minicpmv_jax.orbax_checkpoint`, which also loads it (``MiniCPMV.from_pretrained`` detects it)::

    from convert_weights import convert
    convert("MiniCPM-V-2_6/", "minicpmv-orbax/", dtype="bfloat16")   # or `minicpmv-jax convert SRC DST`
"""

from ._convert import ConversionResult, convert
from ._errors import ConvertError
from ._source import resolve_source

__all__ = ["ConversionResult", "ConvertError", "convert", "resolve_source"]
