"""The attention core (``minicpmv_jax.attention``) against a naive per-head reference, its masks, and its
two schedules (batched; one (batch row, K/V head) group per loop step on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpmv_jax import attention as attn
from minicpmv_jax.attention import MASK_VALUE, attention, causal_mask, key_mask


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
    mask = causal_mask(key_valid, 0, t)
    got = jax.jit(attention)(q, k, v, mask)
    assert got.shape == (b, t, n, h) and got.dtype == jnp.float32
    want = _naive(q, k, v, mask, h ** -0.5)
    assert np.isnan(want[0, :2]).all()                                      # the reference leaves them out
    _close_where_defined(got, want, 1e-5)
    assert np.isfinite(np.asarray(got)).all()


def test_multi_head_with_a_key_padding_mask_matches_the_naive_reference():
    """K == N (plain multi-head), a [B, 1, S] key mask, cross attention (T != S), an explicit scale."""
    b, t, s, n, h = 3, 4, 7, 3, 8
    q, k, v = _qkv(1, b, t, s, n, n, h)
    valid = jnp.asarray(np.arange(s)[None, :] < np.asarray([[7], [3], [1]]))
    got = attention(q, k, v, key_mask(valid), scale=0.3)
    _close_where_defined(got, _naive(q, k, v, key_mask(valid), 0.3), 1e-5)
    unmasked = attention(q, k, v, None)
    _close_where_defined(unmasked, _naive(q, k, v, None, h ** -0.5), 1e-5)


def test_fully_masked_rows_are_finite_and_uniform():
    """Every key masked (an empty padding piece): a uniform softmax, the mean of v, not NaN."""
    q, k, v = _qkv(2, 2, 3, 4, 4, 2, 8)
    none_valid = key_mask(jnp.zeros((2, 4), bool))
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
    mask = {"key": key_mask(valid), "causal": causal_mask(valid, 0, t), "none": None}[mask_kind]
    looped_fn = jax.jit(lambda *a: attention(*a, mask, loop_heads_on_cpu=True))
    assert "stablehlo.while" in looped_fn.lower(q, k, v).as_text()                # the loop, not the batch
    assert "stablehlo.while" not in jax.jit(lambda *a: attention(*a, mask)).lower(q, k, v).as_text()
    looped = looped_fn(q, k, v)
    batched = jax.jit(lambda *a: attn._attention_batched(*a, mask, h ** -0.5))(q, k, v)
    per_group = jax.jit(lambda *a: attn._attention_per_group(*a, mask, h ** -0.5))(q, k, v)
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
    mask = causal_mask(jnp.ones((2, 5), bool), 0, 5)
    want = np.asarray(attention(q, k, v, mask))
    for loop in (False, True):
        got = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, loop_heads_on_cpu=loop)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)
