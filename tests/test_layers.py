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


def test_batch_einsum_merges_contracted_axes_that_end_the_input_and_start_the_kernel():
    """The attention output projection "BTNH,NHD->BTD" traced without a mesh: the same values as the einsum,
    and the compiled product reads the kernel as it is stored (no transposed copy of it, which a decode step
    called from Python would pay on every call). Traced on a mesh the equation is kept as given (a merged
    axis whose minor part is split has no sharding GSPMD can express: test_sharding_activations'
    test_decode_step_moves_no_weight fails with it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minicpmv_jax import sharding
    from minicpmv_jax.layers import batch_einsum

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 14, 64)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((14, 64, 96)), jnp.float32)
    got = batch_einsum("BTNH,NHD->BTD", x, kernel)
    want = jnp.einsum("BTNH,NHD->BTD", x, kernel, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    fn = jax.jit(lambda a, b: batch_einsum("BTNH,NHD->BTD", a, b))
    assert "f32[64,14,96]" not in fn.lower(x, kernel).compile().as_text(), "the kernel is transposed first"

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 1).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with sharding.use_mesh(mesh):
        merged = str(jax.make_jaxpr(lambda a, b: batch_einsum("BTNH,NHD->BTD", a, b))(x, kernel))
    assert "f32[896,96]" in merged, "a one-device mesh merges too"
    if len(jax.devices()) > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 1, 2), ("data", "fsdp", "tensor"))
        with sharding.use_mesh(mesh):
            kept = str(jax.make_jaxpr(lambda a, b: batch_einsum("BTNH,NHD->BTD", a, b))(x, kernel))
        assert "f32[896,96]" not in kept, "on a mesh the equation is kept as given"
