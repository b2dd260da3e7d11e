"""Test helpers shared by the vision / resampler tests: loading reference weights, error metric, images."""

from __future__ import annotations

import numpy as np
from flax import nnx

from minicpmv_jax import checkpoint_names as names
from minicpmv_jax.config import MiniCPMVConfig
from reference import rel_err  # noqa: F401  (re-exported: one error metric for all tests)


def load_tower(module: nnx.Module, cfg: MiniCPMVConfig, tower: str, tensors: dict) -> nnx.Module:
    """Fills a bare tower module from reference tensors (names of DESIGN §2 without the tower prefix)
    through the project's single name table; returns the filled module."""
    full = {f"{tower}.{k}": np.asarray(v) for k, v in tensors.items()}
    return names.load_entries(module, full.__getitem__, names.entries(cfg, (tower,)), strip=1)


def random_image(rng: np.random.Generator, height: int, width: int, patch_size: int = 14) -> np.ndarray:
    """A normalised float32 image [3, h, w] of a ``height × width`` patch grid, values in [-1, 1]."""
    return rng.uniform(-1, 1, (3, height * patch_size, width * patch_size)).astype(np.float32)


# One jitted call for every module and input shape (the module is split into graphdef + state by nnx.jit).
jit_apply = nnx.jit(lambda module, *args: module(*args))
