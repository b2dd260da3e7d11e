"""Conversion of PyTorch safetensors checkpoints (HF layout) to Orbax.

Driven by the same name table as the loader (:mod:`minicpmv_jax.checkpoint_names`) and the same
header-first reader (:class:`minicpmv_jax.hf_checkpoint.HFCheckpoint`); the converter itself arrives
with its own issue.
"""
