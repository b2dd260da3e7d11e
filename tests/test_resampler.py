"""Resampler: parity with torch ``nn.MultiheadAttention`` (random weights), padding, bf16, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import jit_apply, load_tower
from minicpmv_jax import checkpoint_names as names
from minicpmv_jax.config import minicpmv_2_6, tiny
from minicpmv_jax.patches import padded_length
from minicpmv_jax.resampler import Resampler, grid_coords, sincos_2d
from reference import rel_err
from torch_vision_reference import TorchResampler, numpy_state_dict, randomize_, sincos_2d_table

TOL = 1e-4
KV_DIM = 48  # the tiny vision width
GRIDS = [(1, 1), (1, 40), (40, 1), (7, 9), (20, 10), (35, 70), (33, 31), (7, 35), (25, 49), (98, 10)]
MIXED_GRIDS = [(1, 1), (7, 9), (33, 31), (1, 40), (98, 10), (20, 10)]


@pytest.fixture(scope="module", params=[128, 256], ids=["D128-1head", "D256-2heads"])
def setup(request):
    full = tiny(hidden_size=request.param)        # resampler width D, kv width = tiny vision width
    cfg = full.resampler
    assert cfg.kv_dim == KV_DIM
    model = randomize_(TorchResampler(cfg.num_queries, cfg.embed_dim, cfg.kv_dim, head_dim=cfg.head_dim,
                                      eps=cfg.layer_norm_eps), seed=request.param).eval()
    params = numpy_state_dict(model)
    return cfg, model, params, make_resampler(full, params)


def make_resampler(full, params, dtype=jnp.float32):
    resampler = Resampler(full.resampler, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    return load_tower(resampler, full, "resampler", params)


def torch_run(model, x, grid):
    with torch.no_grad():
        return model(torch.from_numpy(x), *grid).numpy()


def padded_inputs(rng, grids, batch_size=None):
    """Encoder-like outputs [B, P, E] (padding filled with large noise) and tgt_sizes [B, 2]."""
    b = batch_size or len(grids)
    p = padded_length(max(h * w for h, w in grids))
    x = (100 * rng.normal(size=(b, p, KV_DIM))).astype(np.float32)
    tgt = np.zeros((b, 2), np.int32)
    pieces = []
    for i, (h, w) in enumerate(grids):
        piece = rng.normal(size=(h * w, KV_DIM)).astype(np.float32)
        x[i, :h * w] = piece
        tgt[i] = h, w
        pieces.append(piece)
    return x, tgt, pieces


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_single_piece_matches_torch(setup, grid):
    cfg, model, _, resampler = setup
    x, tgt, (piece,) = padded_inputs(np.random.default_rng(sum(grid)), [grid])
    ours = np.asarray(jit_apply(resampler, x, tgt))
    assert ours.shape == (1, cfg.num_queries, cfg.embed_dim)
    assert rel_err(ours[0], torch_run(model, piece, grid)) <= TOL


def test_mixed_batch_matches_unpadded_torch_runs(setup):
    cfg, model, _, resampler = setup
    x, tgt, pieces = padded_inputs(np.random.default_rng(5), MIXED_GRIDS, batch_size=len(MIXED_GRIDS) + 1)
    ours = np.asarray(jit_apply(resampler, x, tgt))
    for i, (grid, piece) in enumerate(zip(MIXED_GRIDS, pieces)):
        assert rel_err(ours[i], torch_run(model, piece, grid)) <= TOL, f"piece {i} {grid}"
    assert np.isfinite(ours[-1]).all()  # an empty (0×0) padding piece gives garbage, not NaN


def test_bfloat16_is_finite_and_close_to_float32(setup):
    cfg, _, params, resampler = setup
    grids = [(1, 1), (7, 9), (20, 10), (1, 40)]
    x, tgt, _ = padded_inputs(np.random.default_rng(6), grids)
    ref = np.asarray(jit_apply(resampler, x, tgt))
    bf16 = jit_apply(make_resampler(tiny(hidden_size=cfg.embed_dim), params, jnp.bfloat16), x, tgt)
    assert bf16.dtype == jnp.bfloat16
    bf16 = np.asarray(bf16.astype(jnp.float32))
    assert np.isfinite(bf16).all()
    for i in range(len(grids)):
        assert rel_err(bf16[i], ref[i]) < 5e-2


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (70, 7), (100, 3)])
@pytest.mark.parametrize("dim", [128, 3584])
def test_sincos_2d_matches_reference_table(grid, dim):
    h, w = grid
    rows, cols = np.divmod(np.arange(h * w), w)
    ours = np.asarray(sincos_2d(jnp.asarray(rows), jnp.asarray(cols), dim))
    np.testing.assert_allclose(ours, sincos_2d_table(h, w, dim).numpy(), rtol=0, atol=2e-5)
    # docs/model.md §4 in float64: first half column, last half row; [sin, cos] with ω_i = 10000^(−i/(dim/4)).
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
    angle_c, angle_r = cols[:, None] * omega, rows[:, None] * omega
    exact = np.concatenate([np.sin(angle_c), np.cos(angle_c), np.sin(angle_r), np.cos(angle_r)], axis=1)
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-4)


def test_grid_coords():
    rows, cols, valid = grid_coords(jnp.array([[2, 3], [1, 1], [0, 0]]), 8)
    np.testing.assert_array_equal(rows[0], [0, 0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(cols[0], [0, 1, 2, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(valid, [[1] * 6 + [0] * 2, [1] + [0] * 7, [0] * 8])


# ------------------------------------------------------------------------------------------ full size


def test_full_size_shapes_axes_and_forward():
    cfg = minicpmv_2_6().resampler
    abstract = nnx.eval_shape(lambda: Resampler(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                rngs=nnx.Rngs(0)))
    flat = {path: var for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    expected = {
        ("query",): ((64, 3584), ("resampler_queries", "embed")),
        ("kv_proj", "kernel"): ((1152, 3584), ("vision_embed", "embed")),
        ("q", "kernel"): ((3584, 28, 128), ("embed", "resampler_heads", "head_dim")),
        ("k", "bias"): ((28, 128), ("resampler_heads", "head_dim")),
        ("v", "kernel"): ((3584, 28, 128), ("embed", "resampler_heads", "head_dim")),
        ("o", "kernel"): ((28, 128, 3584), ("resampler_heads", "head_dim", "embed")),
        ("o", "bias"): ((3584,), ("embed",)),
        ("ln_kv", "scale"): ((3584,), ("embed",)),
        ("proj",): ((3584, 3584), ("embed", "resampler_proj")),
    }
    for path, (shape, axes) in expected.items():
        assert flat[path].get_value().shape == shape, path
        assert flat[path].get_metadata()["out_sharding"] == axes, path
    assert ("kv_proj", "bias") not in flat
    assert len(flat) == 17

    graphdef, state = nnx.split(abstract)
    out = jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state,
                         jax.ShapeDtypeStruct((10, 1088, 1152), jnp.bfloat16), jax.ShapeDtypeStruct((10, 2), jnp.int32))
    assert out.shape == (10, 64, 3584) and out.dtype == jnp.bfloat16

    with torch.device("meta"):
        reference = TorchResampler(64, 3584, 1152)
    shapes = {"resampler." + k: tuple(t.shape) for k, t in reference.state_dict().items()}
    assert shapes["resampler.attn.in_proj_weight"] == (10752, 3584)
    assert shapes["resampler.kv_proj.weight"] == (3584, 1152)
    table = names.entries(minicpmv_2_6(), ("resampler",))
    assert {e.path[1:] for e in table} == set(flat)
    assert {e.name: e.hf_shape for e in table} == shapes
    for e in table:
        assert e.shape == flat[e.path[1:]].get_value().shape, (e.path, e.name)
