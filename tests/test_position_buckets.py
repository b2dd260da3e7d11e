"""Exact position-id bucketing (docs/model.md §3) against torch's own arithmetic."""

import numpy as np
import pytest

from minicpmv_jax.position_buckets import bucket_coords, position_ids
from torch_vision_reference import torch_bucket_coords

MAX_SIDE = 700


def test_bucket_coords_match_torch_for_every_side_up_to_700():
    mismatched = [n for n in range(1, MAX_SIDE + 1)
                  if not np.array_equal(bucket_coords(n), torch_bucket_coords(n).numpy())]
    assert mismatched == []


def test_bucket_coords_are_floor_except_some_ties_one_lower():
    ties_lower = 0
    for n in range(1, MAX_SIDE + 1):
        r = np.arange(n)
        exact = (70 * r) // n
        got = bucket_coords(n)
        off = got != exact
        assert np.all((70 * r[off]) % n == 0), f"side {n}: a non-tie differs from floor(70 r / n)"
        assert np.all(got[off] == exact[off] - 1), f"side {n}: a tie is off by more than one"
        ties_lower += int(off.sum())
    assert ties_lower > 0  # the float32 rule matters: plain floor would be wrong


@pytest.mark.parametrize("side", [1, 2, 7, 10, 64, 70, 71, 100])
def test_other_table_sides_match_torch(side):
    for n in (1, 3, 7, 16, 25, 49, 50, 100, 333):
        np.testing.assert_array_equal(bucket_coords(n, side), torch_bucket_coords(n, side).numpy(),
                                      err_msg=f"side={side} n={n}")


@pytest.mark.parametrize("height,width", [(1, 1), (7, 9), (25, 49), (98, 10), (35, 70), (1, 140)])
def test_position_ids_are_row_major_grid(height, width):
    ids = position_ids(height, width)
    assert ids.shape == (height * width,) and ids.dtype == np.int32
    expected = (torch_bucket_coords(height)[:, None] * 70 + torch_bucket_coords(width)[None, :]).flatten()
    np.testing.assert_array_equal(ids, expected.numpy())
    assert ids.min() >= 0 and ids.max() < 4900


def test_cached_results_are_read_only():
    ids = position_ids(5, 6)
    assert ids is position_ids(5, 6)
    with pytest.raises(ValueError):
        ids[0] = 1
    with pytest.raises(ValueError):
        bucket_coords(5)[0] = 1


@pytest.mark.parametrize("height,width", [(0, 3), (3, 0), (-1, 1)])
def test_empty_grid_is_an_error(height, width):
    with pytest.raises(ValueError, match="at least 1"):
        position_ids(height, width)


def test_side_70_boundaries_are_the_design_formula():
    from minicpmv_jax.position_buckets import _boundaries

    k = np.arange(1, 70)
    np.testing.assert_array_equal(_boundaries(70), (1 / 70 + (k - 1) * (1 / 70)).astype(np.float32))
