"""The converter's one error type (a ``CheckpointError``, so callers and the CLI report it like one)."""

from minicpmv_jax.hf_checkpoint import CheckpointError


class ConvertError(CheckpointError):
    """The conversion cannot start or finish: a bad source, an existing destination, a failed write."""
