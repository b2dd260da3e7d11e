"""Patchify and piece batching (host-side encoder inputs)."""

import numpy as np
import pytest
import torch

from minicpmv_jax.patches import DEFAULT_PATCH_BUCKETS, LARGE_PATCH_MULTIPLE, pack_pieces, padded_length, patchify
from minicpmv_jax.position_buckets import position_ids
from minicpmv_jax.checkpoint_names import ConvToPatchKernel


def test_patchify_then_kernel_equals_conv2d():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 14 * 5, 14 * 3)).astype(np.float32)
    weight = rng.normal(size=(11, 3, 14, 14)).astype(np.float32)
    ours = patchify(image) @ ConvToPatchKernel(3, 14)(weight)
    ref = torch.nn.functional.conv2d(torch.from_numpy(image)[None], torch.from_numpy(weight), stride=14)
    ref = ref[0].flatten(1).T.numpy()  # [H·W, D], row-major over the grid
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 14, 15), (3, 0, 14), (14, 14)])
def test_patchify_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        patchify(np.zeros(shape, np.float32))


def test_padded_length():
    assert [padded_length(n) for n in (1, 64, 65, 1024, 1025, 1089, 2048)] == [64, 64, 256, 1024, 1088, 1152, 2048]
    assert padded_length(2049) == 2048 + LARGE_PATCH_MULTIPLE
    assert padded_length(2450) == 2560
    assert padded_length(10, buckets=(16, 8)) == 16
    assert list(DEFAULT_PATCH_BUCKETS) == sorted(DEFAULT_PATCH_BUCKETS)


def test_pack_pieces_layout():
    rng = np.random.default_rng(1)
    grids = [(7, 9), (1, 1), (20, 10)]
    images = [rng.normal(size=(3, 14 * h, 14 * w)).astype(np.float32) for h, w in grids]
    patches, pos, valid, tgt = pack_pieces(images, batch_size=4)
    assert patches.shape == (4, 256, 588) and patches.dtype == np.float32
    assert pos.shape == valid.shape == (4, 256) and pos.dtype == np.int32 and valid.dtype == bool
    np.testing.assert_array_equal(tgt, [[7, 9], [1, 1], [20, 10], [0, 0]])
    for i, ((h, w), image) in enumerate(zip(grids, images)):
        n = h * w
        np.testing.assert_array_equal(patches[i, :n], patchify(image))
        np.testing.assert_array_equal(pos[i, :n], position_ids(h, w))
        assert valid[i, :n].all() and not valid[i, n:].any()
        assert not patches[i, n:].any() and not pos[i, n:].any()
    assert not valid[3].any() and not patches[3].any()


def test_pack_pieces_errors_name_the_piece():
    good = np.zeros((3, 14, 28), np.float32)
    with pytest.raises(ValueError, match="piece 1"):
        pack_pieces([good, np.zeros((3, 14, 20), np.float32)])
    with pytest.raises(ValueError, match="batch_size"):
        pack_pieces([good, good], batch_size=1)
