"""The dtypes a model computes in and stores its parameters in, named or given as dtypes.

:func:`as_dtype` is the one parser of a ``dtype=`` argument: ``MiniCPMV(dtype=..., param_dtype=...)``,
the converter's ``dtype``, fine-tuning's compute dtype and export dtype, and the memory plan all take the
same three names (or the matching jnp / numpy dtypes) and word a bad value the same way.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = ["as_dtype"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any, argument: str = "dtype") -> jnp.dtype:
    """``"bfloat16"`` / ``jnp.bfloat16`` / numpy dtype → a jnp dtype; anything else is a clear error."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"{argument}={dtype!r}: expected one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d.name not in _DTYPES:
        raise ValueError(f"{argument}={d.name}: expected one of {sorted(_DTYPES)}")
    return d
