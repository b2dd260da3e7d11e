"""SigLIP encoder: parity with the torch reference (random weights, tiny sizes), padding, bf16, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import jit_apply, load_tower, random_image
from minicpmv_jax import checkpoint_names as names
from minicpmv_jax.config import minicpmv_2_6, tiny
from minicpmv_jax.patches import pack_pieces
from minicpmv_jax.position_buckets import bucket_coords
from minicpmv_jax.vision import VisionEncoder
from reference import rel_err
from torch_vision_reference import TorchSiglip, numpy_state_dict, randomize_

TOL = 1e-4
GRIDS = [(1, 1), (1, 40), (40, 1), (7, 9), (20, 10), (35, 70), (33, 31)]
# Sides where some fractional coordinate lands exactly on a bucket boundary (70·r/H an integer); 25, 49,
# 50, 55, 58 and 98 include ties that the float32 rule puts one bucket lower than floor(70·r/H).
BOUNDARY_GRIDS = [(7, 35), (25, 49), (50, 14), (1, 58), (55, 1), (98, 10)]
MIXED_GRIDS = [(1, 1), (7, 9), (33, 31), (1, 40), (98, 10), (20, 10)]


@pytest.fixture(scope="module")
def cfg():
    return tiny()


@pytest.fixture(scope="module")
def torch_model(cfg):
    v = cfg.vision
    model = TorchSiglip(v.hidden_size, v.intermediate_size, v.num_attention_heads, cfg.num_vision_layers,
                        patch_size=v.patch_size, side=v.num_patches_per_side, eps=v.layer_norm_eps)
    return randomize_(model, seed=0).eval()


@pytest.fixture(scope="module")
def params(cfg, torch_model):
    """The reference's tensors, named as in the checkpoint without ``vpm.``."""
    return numpy_state_dict(torch_model)


def make_encoder(cfg, params, dtype=jnp.float32):
    encoder = VisionEncoder(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    return load_tower(encoder, cfg, "vpm", params)


@pytest.fixture(scope="module")
def encoder(cfg, params):
    return make_encoder(cfg, params)


def torch_run(model, image):
    with torch.no_grad():
        return model(torch.from_numpy(image)).numpy()


def test_boundary_grids_hit_float32_ties():
    sides = {s for grid in BOUNDARY_GRIDS for s in grid}
    lower = [s for s in sides if np.any(bucket_coords(s) != (70 * np.arange(s)) // s)]
    assert len(lower) >= 4


@pytest.mark.parametrize("grid", GRIDS + BOUNDARY_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_single_piece_matches_torch(encoder, torch_model, grid):
    image = random_image(np.random.default_rng(sum(grid)), *grid)
    patches, pos, valid, _ = pack_pieces([image])
    n = grid[0] * grid[1]
    ours = np.asarray(jit_apply(encoder, patches, pos, valid))[0]
    ref = torch_run(torch_model, image)
    assert ref.shape == (n, 48)
    assert rel_err(ours[:n], ref) <= TOL


@pytest.fixture(scope="module")
def mixed_batch():
    rng = np.random.default_rng(7)
    images = [random_image(rng, *grid) for grid in MIXED_GRIDS]
    return images, pack_pieces(images, batch_size=len(images) + 1)  # + one empty padding piece


def test_mixed_batch_matches_unpadded_torch_runs(encoder, torch_model, mixed_batch):
    images, (patches, pos, valid, tgt) = mixed_batch
    assert patches.shape[:2] == (len(images) + 1, 1024)
    ours = np.asarray(jit_apply(encoder, patches, pos, valid))
    for i, image in enumerate(images):
        n = int(tgt[i, 0] * tgt[i, 1])
        assert rel_err(ours[i, :n], torch_run(torch_model, image)) <= TOL, f"piece {i} {tuple(tgt[i])}"
    assert np.isfinite(ours).all()  # padding rows are garbage, but never NaN (not even an empty piece)


def test_padding_content_does_not_leak(encoder, mixed_batch):
    _, (patches, pos, valid, tgt) = mixed_batch
    noisy = np.where(valid[..., None], patches, 1e3 * np.random.default_rng(3).normal(size=patches.shape))
    noisy_pos = np.where(valid, pos, 4899)
    a = np.asarray(jit_apply(encoder, patches, pos, valid))
    b = np.asarray(jit_apply(encoder, noisy.astype(np.float32), noisy_pos.astype(np.int32), valid))
    for i in range(len(MIXED_GRIDS)):
        n = int(tgt[i, 0] * tgt[i, 1])
        np.testing.assert_allclose(a[i, :n], b[i, :n], rtol=0, atol=1e-5)


def test_bfloat16_is_finite_and_close_to_float32(cfg, params, encoder, mixed_batch):
    _, (patches, pos, valid, tgt) = mixed_batch
    ref = np.asarray(jit_apply(encoder, patches, pos, valid))
    bf16 = jit_apply(make_encoder(cfg, params, jnp.bfloat16), patches, pos, valid)
    assert bf16.dtype == jnp.bfloat16
    bf16 = np.asarray(bf16.astype(jnp.float32))
    assert np.isfinite(bf16).all()
    for i in range(len(MIXED_GRIDS)):
        n = int(tgt[i, 0] * tgt[i, 1])
        assert rel_err(bf16[i, :n], ref[i, :n]) < 5e-2


# ------------------------------------------------------------------------------------------ full size

EXPECTED_AXES = {
    ("patch_embed", "kernel"): ("vision_patch", "vision_embed"),
    ("patch_embed", "bias"): ("vision_embed",),
    ("pos_embed",): ("vision_pos", "vision_embed"),
    ("attn", "q", "kernel"): ("vision_embed", "vision_heads", "vision_head_dim"),
    ("attn", "q", "bias"): ("vision_heads", "vision_head_dim"),
    ("attn", "o", "kernel"): ("vision_heads", "vision_head_dim", "vision_embed"),
    ("attn", "o", "bias"): ("vision_embed",),
    ("mlp", "fc1", "kernel"): ("vision_embed", "vision_mlp"),
    ("mlp", "fc1", "bias"): ("vision_mlp",),
    ("mlp", "fc2", "kernel"): ("vision_mlp", "vision_embed"),
    ("mlp", "fc2", "bias"): ("vision_embed",),
    ("ln1", "scale"): ("vision_embed",),
    ("post_ln", "bias"): ("vision_embed",),
}


@pytest.fixture(scope="module")
def full_encoder():
    return nnx.eval_shape(lambda: VisionEncoder(minicpmv_2_6(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                rngs=nnx.Rngs(0)))


def test_full_size_shapes_and_axes(full_encoder):
    flat = dict(nnx.to_flat_state(nnx.state(full_encoder, nnx.Param)))
    assert len(full_encoder.layers) == 26
    shapes = {path: var.get_value().shape for path, var in flat.items()}
    assert shapes[("patch_embed", "kernel")] == (588, 1152)
    assert shapes[("pos_embed",)] == (4900, 1152)
    assert shapes[("layers", 25, "attn", "k", "kernel")] == (1152, 16, 72)
    assert shapes[("layers", 0, "attn", "o", "kernel")] == (16, 72, 1152)
    assert shapes[("layers", 3, "mlp", "fc1", "kernel")] == (1152, 4304)
    for path, var in flat.items():
        assert var.get_value().dtype == jnp.bfloat16
        key = path[2:] if path[0] == "layers" else path
        if key in EXPECTED_AXES:
            assert var.get_metadata()["out_sharding"] == EXPECTED_AXES[key], path
    v = minicpmv_2_6().vision
    per_layer = 4 * (v.hidden_size ** 2 + v.hidden_size) + 2 * v.hidden_size * v.intermediate_size \
        + v.intermediate_size + v.hidden_size + 4 * v.hidden_size
    expected = (v.patch_dim + 1 + v.num_positions + 2) * v.hidden_size + 26 * per_layer
    assert sum(int(np.prod(s)) for s in shapes.values()) == expected


def test_full_size_forward_shape(full_encoder):
    graphdef, state = nnx.split(full_encoder)
    out = jax.eval_shape(lambda s, p, i, m: nnx.merge(graphdef, s)(p, i, m), state,
                         jax.ShapeDtypeStruct((3, 1088, 588), jnp.float32),
                         jax.ShapeDtypeStruct((3, 1088), jnp.int32), jax.ShapeDtypeStruct((3, 1088), jnp.bool_))
    assert out.shape == (3, 1088, 1152) and out.dtype == jnp.bfloat16


def test_full_size_name_table_covers_checkpoint(full_encoder):
    cfg = minicpmv_2_6()
    v = cfg.vision
    with torch.device("meta"):
        reference = TorchSiglip(v.hidden_size, v.intermediate_size, v.num_attention_heads, cfg.num_vision_layers)
    shapes = {k: tuple(t.shape) for k, t in reference.state_dict().items()}
    # docs/model.md §2 shapes, as a check on the reference itself.
    assert shapes["embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes["embeddings.position_embedding.weight"] == (4900, 1152)
    assert shapes["encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["encoder.layers.0.self_attn.out_proj.bias"] == (1152,)
    flat = {path: var.get_value().shape for path, var in nnx.to_flat_state(nnx.state(full_encoder, nnx.Param))}
    table = names.entries(cfg, ("vpm",))
    assert {e.path[1:] for e in table} == set(flat)
    assert len(table) == len(flat) == len(names_ := {"vpm." + k: v for k, v in shapes.items()})
    assert {e.name: e.hf_shape for e in table} == names_
    for e in table:
        assert e.shape == flat[e.path[1:]], (e.path, e.name)


def test_missing_tensor_is_named(cfg, params):
    partial = dict(params)
    del partial["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match=r"vpm\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        make_encoder(cfg, partial)
