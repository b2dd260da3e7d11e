"""The attention core (``minicpmv_jax.attention``) against a naive per-head reference: its masks, the dense
kernel's two schedules (batched; one (batch row, K/V head) group per loop step on CPU), the blockwise
kernel, the platform kernels (Pallas in interpret mode on CPU; cuDNN through the same
``jax.nn.dot_product_attention`` call with the XLA implementation) and the choice of kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpmv_jax import attention as attn
from minicpmv_jax.attention import MASK_VALUE, Mask, attention, causal_mask, key_mask, resolve


def _naive(q, k, v, mask, scale):
    """Per (row, query head) in float64: query head n uses K/V head n // G. Rows with no visible key: NaN."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    mask = np.ones((b, 1, s), bool) if mask is None else np.broadcast_to(np.asarray(mask), (b, t, s))
    out = np.full((b, t, n, h), np.nan)
    for r in range(b):
        for head in range(n):
            kh = head // g
            for i in range(t):
                seen = mask[r, min(i, mask.shape[1] - 1)]
                if not seen.any():
                    continue
                logits = q[r, i, head] @ k[r, seen, kh].T * scale
                p = np.exp(logits - logits.max())
                out[r, i, head] = (p / p.sum()) @ v[r, seen, kh]
    return out


def _qkv(seed, b, t, s, n, kv_heads, h, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, s, kv_heads, h), dtype)
    v = jax.random.normal(keys[2], (b, s, kv_heads, h), dtype)
    return q, k, v


def _close_where_defined(got, want, tol):
    defined = ~np.isnan(want)
    np.testing.assert_allclose(np.asarray(got, np.float64)[defined], want[defined], rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------- masks


def test_causal_mask_sees_valid_slots_up_to_its_own():
    key_valid = jnp.asarray([[False, True, True, True, False, False],
                             [True, True, True, True, True, False]])
    prefill = np.asarray(causal_mask(key_valid, 0, 4))                      # queries at slots 0..3
    assert prefill.shape == (2, 4, 6) and prefill.dtype == bool
    assert not prefill[0, 0].any()                                          # a left-padding position
    np.testing.assert_array_equal(prefill[0, 2], [False, True, True, False, False, False])
    np.testing.assert_array_equal(prefill[1], np.tril(np.ones((4, 6), bool)))
    step = np.asarray(causal_mask(key_valid, jnp.int32(4), 1))             # one query at slot 4
    np.testing.assert_array_equal(step[:, 0], np.asarray(key_valid))
    traced = jax.jit(causal_mask, static_argnums=2)(key_valid, jnp.int32(2), 2)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(causal_mask(key_valid, 2, 2)))


def test_key_mask_is_one_row_for_every_query():
    valid = jnp.asarray([[True, False, True], [False, False, False]])
    mask = key_mask(valid)
    assert mask.shape == (2, 1, 3) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask[:, 0]), np.asarray(valid))
    assert key_mask(None) is None


def test_mask_value_is_finite():
    assert np.isfinite(np.float32(MASK_VALUE)) and MASK_VALUE < -1e38


# ------------------------------------------------------------------------------------------------ the core


def test_grouped_query_heads_match_the_naive_reference():
    """G = 4 query heads per K/V head, a left-padded causal mask with a fully masked row."""
    b, t, n, kv_heads, h = 2, 5, 8, 2, 16
    q, k, v = _qkv(0, b, t, t, n, kv_heads, h)
    key_valid = jnp.asarray([[False, False, True, True, True], [True] * 5])
    got = jax.jit(attention)(q, k, v, Mask(key_valid, 0))
    assert got.shape == (b, t, n, h) and got.dtype == jnp.float32
    want = _naive(q, k, v, causal_mask(key_valid, 0, t), h ** -0.5)
    assert np.isnan(want[0, :2]).all()                                      # the reference leaves them out
    _close_where_defined(got, want, 1e-5)
    assert np.isfinite(np.asarray(got)).all()


def test_multi_head_with_a_key_padding_mask_matches_the_naive_reference():
    """K == N (plain multi-head), a [B, 1, S] key mask, cross attention (T != S), an explicit scale."""
    b, t, s, n, h = 3, 4, 7, 3, 8
    q, k, v = _qkv(1, b, t, s, n, n, h)
    valid = jnp.asarray(np.arange(s)[None, :] < np.asarray([[7], [3], [1]]))
    got = attention(q, k, v, Mask(valid), scale=0.3)
    _close_where_defined(got, _naive(q, k, v, key_mask(valid), 0.3), 1e-5)
    unmasked = attention(q, k, v, None)
    _close_where_defined(unmasked, _naive(q, k, v, None, h ** -0.5), 1e-5)


def test_fully_masked_rows_are_finite_and_uniform():
    """Every key masked (an empty padding piece): a uniform softmax, the mean of v, not NaN."""
    q, k, v = _qkv(2, 2, 3, 4, 4, 2, 8)
    none_valid = Mask(jnp.zeros((2, 4), bool))
    for loop in (False, True):
        got = np.asarray(attention(q, k, v, none_valid, loop_heads_on_cpu=loop))
        assert np.isfinite(got).all()
        mean_v = np.repeat(np.asarray(v).mean(axis=1), 2, axis=1)              # [B, N, H], head n uses n // 2
        np.testing.assert_allclose(got, np.broadcast_to(mean_v[:, None], got.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads, mask_kind", [(4, "key"), (2, "causal"), (1, "none")])
def test_cpu_loop_schedule_equals_the_batched_one(kv_heads, mask_kind):
    """``loop_heads_on_cpu=True`` (on this CPU backend: one group per loop step) gives the batched
    schedule's result, forward and gradient."""
    b, t, n, h = 2, 6, 4, 8
    q, k, v = _qkv(3, b, t, t, n, kv_heads, h)
    valid = jnp.asarray([[True] * 6, [False, False, True, True, True, False]])
    mask = {"key": Mask(valid), "causal": Mask(valid, 0), "none": None}[mask_kind]
    dense = None if mask is None else mask.dense(t)
    looped_fn = jax.jit(lambda *a: attention(*a, mask, loop_heads_on_cpu=True))
    assert "stablehlo.while" in looped_fn.lower(q, k, v).as_text()                # the loop, not the batch
    assert "stablehlo.while" not in jax.jit(lambda *a: attention(*a, mask)).lower(q, k, v).as_text()
    looped = looped_fn(q, k, v)
    batched = jax.jit(lambda *a: attn._attention_batched(*a, dense, h ** -0.5))(q, k, v)
    per_group = jax.jit(lambda *a: attn._attention_per_group(*a, dense, h ** -0.5))(q, k, v)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(batched), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(per_group), np.asarray(batched), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask)), np.asarray(batched), rtol=1e-6, atol=1e-6)

    def loss(loop):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, loop_heads_on_cpu=loop)))

    grads_loop = jax.jit(jax.grad(loss(True), argnums=(0, 1, 2)))(q, k, v)
    grads_batched = jax.jit(jax.grad(loss(False), argnums=(0, 1, 2)))(q, k, v)
    for a, b_ in zip(grads_loop, grads_batched):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_softmax_in_float32():
    """bfloat16 q, k, v: the result is bfloat16 (v's dtype) and close to the float32 result."""
    q, k, v = _qkv(4, 2, 5, 5, 4, 2, 16)
    mask = Mask(jnp.ones((2, 5), bool), 0)
    want = np.asarray(attention(q, k, v, mask))
    for loop in (False, True):
        got = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, loop_heads_on_cpu=loop)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)


# ------------------------------------------------------------------------------------------ the kernels


def _prefill_case(seed, b=2, t=37, extra=19, n=8, kv_heads=2, h=16):
    """A prefill from slot 0 into a cache of t + extra slots: row 0 left-padded by 5, the spare slots
    invalid (their keys are noise, as an unwritten cache's zeros would be harmless too)."""
    q, k, v = _qkv(seed, b, t, t + extra, n, kv_heads, h)
    key_valid = np.zeros((b, t + extra), bool)
    key_valid[:, :t] = True
    key_valid[0, :5] = False
    return q, k, v, jnp.asarray(key_valid)


@pytest.mark.parametrize("blocks", [(16, 16), (8, 32), (512, 512)], ids=str)
def test_blockwise_equals_the_dense_kernel(blocks):
    """Causal from slot 0 with left padding and spare slots, and bidirectional with key padding: within
    1e-5 of the dense kernel on every defined row, for blocks that do and do not divide T and S."""
    q, k, v, key_valid = _prefill_case(5)
    t = q.shape[1]
    for mask in (Mask(key_valid, 0), Mask(key_valid)):
        want = np.asarray(attention(q, k, v, mask, scale=0.25))
        got = np.asarray(jax.jit(lambda *a: attn._attention_blockwise(*a, mask, 0.25, *blocks))(q, k, v))
        rows = np.asarray(key_valid[:, :t]) if mask.causal_offset is not None else np.ones((2, t), bool)
        assert want.shape == got.shape and np.isfinite(got).all()
        np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)


def test_blockwise_at_a_later_offset_and_skipping_hidden_blocks():
    """Queries written at slots [40, 48) of a 96-slot cache (a chunk after a prefix): the same as dense;
    and with a causal mask the loop visits only the key blocks up to the last query's slot."""
    q, k, v = _qkv(6, 1, 8, 96, 4, 1, 8)
    key_valid = jnp.asarray(np.arange(96)[None] < 48)
    mask = Mask(key_valid, jnp.int32(40))
    want = np.asarray(attention(q, k, v, mask))
    got = np.asarray(jax.jit(lambda *a: attn._attention_blockwise(*a, mask, 8 ** -0.5, 8, 16))(q, k, v))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Keys after the queries' slots never count: noise there changes nothing.
    noisy = k.at[:, 48:].set(1e4), v.at[:, 48:].set(1e4)
    again = jax.jit(lambda *a: attn._attention_blockwise(*a, mask, 8 ** -0.5, 8, 16))(q, *noisy)
    np.testing.assert_array_equal(np.asarray(again), got)


def test_blockwise_memory_is_linear_in_the_length():
    """Compiled temporaries at T = 4096 against 1024 (one row, 4 heads, H 64): the dense kernel's grow
    with T·S (16×), the blockwise kernel's with T."""
    def temp_bytes(kernel, t):
        q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
        valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
        fn = jax.jit(lambda q, k, v, m: attention(q, k, v, Mask(m, 0), implementation=kernel))
        return fn.lower(q, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes("xla", 4096) / temp_bytes("xla", 1024)
    blockwise = temp_bytes("blockwise", 4096) / temp_bytes("blockwise", 1024)
    assert dense > 12 and blockwise < 5, (dense, blockwise)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_splash_kernel_in_interpret_mode_equals_the_dense_kernel(causal):
    """Pallas splash attention (TPU), run by the Pallas interpreter on CPU: lengths padded to 128-lane
    tiles, left padding as segment ids, GQA as one multi-query kernel per K/V head."""
    q, k, v, key_valid = _prefill_case(7)
    t = q.shape[1]
    mask = Mask(key_valid, 0) if causal else Mask(key_valid)
    want = np.asarray(attention(q, k, v, mask))
    got = np.asarray(attention(q, k, v, mask, implementation="splash"))
    rows = np.asarray(key_valid[:, :t]) if causal else np.ones((2, t), bool)
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [128, 1088, 80, 23])
def test_gpu_decode_kernel_in_interpret_mode_reads_only_the_valid_run(slots):
    """The Pallas GPU decode kernel, run by the Pallas interpreter on CPU: one query per row at slot
    ``slots // 2``, row 0's prompt left-padded by 7; noise in the slots after the query changes nothing.
    Cache lengths as generation makes them (T + N: 1088 = 1024 + 64, 80) and an odd one: the kernel's
    blocks must divide the slots (powers of two, as Triton needs)."""
    at = slots // 2
    q, k, v = _qkv(8, 2, 1, slots, 8, 2, 16)
    key_valid = np.zeros((2, slots), bool)
    key_valid[:, :at + 1] = True
    key_valid[0, :7] = False
    mask = Mask(jnp.asarray(key_valid), jnp.int32(at))
    want = np.asarray(attention(q, k, v, mask))
    got = np.asarray(attention(q, k.at[:, at + 1:].set(50.0), v, mask, implementation="gpu_decode"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one query per row"):
        attention(*_qkv(8, 2, 2, 128, 8, 2, 16), mask, implementation="gpu_decode")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cudnn_call_masks_equal_the_dense_kernel(causal):
    """The cuDNN kernel's call (``jax.nn.dot_product_attention``: keys cut to the prompt's slots, the
    causal mask top-left aligned, left padding as a key mask) with the XLA implementation on CPU."""
    q, k, v, key_valid = _prefill_case(9)
    t = q.shape[1]
    mask = Mask(key_valid, 0) if causal else Mask(key_valid)
    want = np.asarray(attention(q, k, v, mask))
    got = np.asarray(attn._attention_dot_product(q, k, v, mask, 16 ** -0.5, "xla"))
    rows = np.asarray(key_valid[:, :t]) if causal else np.ones((2, t), bool)
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_cudnn_refuses_a_backend_without_cudnn():
    q, k, v, key_valid = _prefill_case(9)
    with pytest.raises(ValueError, match="'cudnn' needs a GPU; this backend is cpu"):
        attention(q, k, v, Mask(key_valid, 0), implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs only on a GPU; "
                    "test_cudnn_call_masks_equal_the_dense_kernel checks the same call with XLA here")
def test_cudnn_kernel_on_the_gpu_equals_the_dense_kernel():
    q, k, v, key_valid = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _prefill_case(9))
    t = q.shape[1]
    want = np.asarray(attention(q, k, v, Mask(key_valid, 0)), np.float32)
    got = np.asarray(attention(q, k, v, Mask(key_valid, 0), implementation="cudnn"), np.float32)
    rows = np.asarray(key_valid[:, :t])
    np.testing.assert_allclose(got[rows], want[rows], atol=2e-2)


def test_a_kernel_that_needs_a_prefill_refuses_another_offset():
    q, k, v = _qkv(6, 1, 8, 96, 4, 1, 8)
    with pytest.raises(ValueError, match="'splash' takes a causal mask from slot 0"):
        attention(q, k, v, Mask(jnp.ones((1, 96), bool), jnp.int32(40)), implementation="splash")


@pytest.mark.parametrize("backend, dtype, queries, cached, want", [
    ("cpu", "float32", 1, True, "xla"), ("cpu", "float32", 1024, True, "blockwise"),
    ("cpu", "float32", 64, True, "xla"), ("cpu", "float32", 4096, False, "xla"),
    ("gpu", "bfloat16", 1, True, "gpu_decode"), ("gpu", "bfloat16", 64, True, "cudnn"),
    ("gpu", "float32", 2048, True, "blockwise"), ("gpu", "bfloat16", 64, False, "xla"),
    ("tpu", "bfloat16", 64, True, "splash"), ("tpu", "bfloat16", 1, True, "xla"),
], ids=str)
def test_auto_picks_by_backend_dtype_and_phase(backend, dtype, queries, cached, want):
    assert resolve("auto", num_queries=queries, cached=cached, dtype=dtype, backend=backend) == want


def test_auto_on_a_mesh_keeps_to_kernels_xla_partitions():
    assert resolve("auto", num_queries=1, cached=True, dtype="bfloat16", backend="gpu", sharded=True) == "xla"
    assert resolve("auto", num_queries=4096, cached=True, dtype="bfloat16", backend="tpu", sharded=True) == "blockwise"
    assert resolve("auto", num_queries=64, cached=True, dtype="bfloat16", backend="gpu", sharded=True) == "cudnn"


def test_explicit_choices_and_bad_names():
    assert resolve("blockwise", num_queries=64, cached=False, dtype="float32", backend="cpu") == "blockwise"
    assert resolve("blockwise", num_queries=1, cached=True, dtype="float32", backend="cpu") == "xla"
    assert resolve("gpu_decode", num_queries=64, cached=True, dtype="float32", backend="cpu") == "xla"
    assert resolve("gpu_decode", num_queries=1, cached=True, dtype="float32", backend="cpu") == "gpu_decode"
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        resolve("flash", num_queries=1, cached=True, dtype="float32")
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        attention(*_qkv(0, 1, 2, 2, 2, 2, 4), None, implementation="auto")


def test_one_causal_offset_per_row_equals_each_row_alone():
    """Rows at different positions (decode slots of different requests): a ``[B]`` causal offset gives
    each row what a call with its own scalar offset gives, with the dense, blockwise and GPU decode
    kernels; the KV cache is written at each row's own slot."""
    from minicpmv_jax import kv_cache

    b, s, n, kv_heads, h = 3, 96, 4, 2, 8
    for t, kernels in ((5, ("xla", "blockwise")), (1, ("xla", "blockwise", "gpu_decode"))):
        q, k, v = _qkv(11, b, t, s, n, kv_heads, h)
        offsets = jnp.asarray([0, 40, 90 - t], jnp.int32)
        key_valid = jnp.asarray(np.arange(s)[None] <= np.asarray(offsets)[:, None] + t - 1)
        for kernel in kernels:
            got = np.asarray(attention(q, k, v, Mask(key_valid, offsets), implementation=kernel))
            for r in range(b):
                alone = attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], Mask(key_valid[r:r + 1], offsets[r]))
                np.testing.assert_allclose(got[r], np.asarray(alone)[0], rtol=1e-5, atol=1e-5, err_msg=kernel)
    buffer = jnp.zeros((b, s, kv_heads, h))
    new = jnp.ones((b, 2, kv_heads, h)) * jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None]
    written = np.asarray(kv_cache.write(buffer, new, jnp.asarray([0, 40, 94])))
    for r, at in enumerate((0, 40, 94)):
        assert (written[r, at:at + 2] == r + 1).all() and written[r].sum() == (r + 1) * 2 * kv_heads * h
