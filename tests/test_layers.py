"""Scheduling helpers of the building-blocks layer (``minicpmv_jax.layers``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minicpmv_jax.layers import per_piece_on_cpu


def test_per_piece_on_cpu_equals_the_batched_call():
    """Each piece through ``fn`` as a batch of one (a loop on CPU): the batched call's result, every leaf
    of a tuple result, and None arguments passed through."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    w = jax.random.normal(jax.random.key(1), (3, 4))

    def fn(x, w, unused):
        assert unused is None
        return jnp.einsum("BPC,BC->BP", x, w), x.sum(axis=(1, 2))

    looped = jax.jit(lambda x, w: per_piece_on_cpu(fn, x, w, None))
    assert "stablehlo.while" in looped.lower(x, w).as_text()
    for got, want in zip(looped(x, w), fn(x, w, None)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
