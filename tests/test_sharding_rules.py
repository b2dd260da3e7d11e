"""Sharding: meshes, the rules resolver, golden per-parameter specs, and placement on 8 CPU devices.

The test session runs with 8 simulated CPU devices (conftest). Expected specs and shard counts are
written by hand from the rules in ``sharding/rules.py`` and the model's sizes (docs/model.md §2):

    full size   Qwen2 D 3584, N 28, K 4, H 128, F 18944, V 151666 = 2 × 75833;
                SigLIP D 1152, 16 heads of 72, F 4304; resampler 28 heads of 128
    tiny        Qwen2 D 128, N 4, K 2, H 32, F 344, V 151666; SigLIP D 48, 3 heads of 16, F 104;
                resampler 1 head of 128

so with tensor = 8 neither query heads, KV heads nor the vocabulary divide, and the fallbacks
(``head_dim``, ``embed``) carry the split.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from minicpmv_jax import kv_cache, memory_plan
from minicpmv_jax import sharding as S
from minicpmv_jax.config import minicpmv_2_6, tiny
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax import MiniCPMV

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
FT = ("fsdp", "tensor")


def _mesh_id(shape):
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------- make_mesh


@pytest.mark.parametrize("shape", MESHES, ids=_mesh_id)
def test_make_mesh_shapes(shape):
    mesh = S.make_mesh(*shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.devices.shape) == shape
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_rest_of_devices():
    assert S.mesh_shape(S.make_mesh()) == (1, 8, 1)                    # default: pure fsdp
    assert S.mesh_shape(S.make_mesh(data=2, fsdp=-1, tensor=2)) == (2, 2, 2)
    assert S.mesh_shape(S.make_mesh(data=-1, fsdp=1, tensor=4)) == (2, 1, 4)
    assert S.mesh_shape(S.make_mesh(fsdp=1, tensor=-1, devices=jax.devices()[:4])) == (1, 1, 4)


def test_make_mesh_errors_name_the_product():
    with pytest.raises(ValueError, match=r"^data=2 × fsdp=2 × tensor=4 = 16 devices, but 8 devices are given"):
        S.make_mesh(data=2, fsdp=2, tensor=4)
    with pytest.raises(ValueError, match=r"^data=1 × fsdp=1 × tensor=1 = 1 device, but 8 devices are given"):
        S.make_mesh(data=1, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match=r"= 2 devices, but 1 device is given"):
        S.make_mesh(data=2, fsdp=1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"fsdp=-1 takes the rest of the 8 devices, but 8 is not divisible by "
                                         r"data=1 × tensor=3 = 3"):
        S.make_mesh(tensor=3)
    with pytest.raises(ValueError, match=r"only one axis may be -1"):
        S.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ArgumentError, match=r"^tensor=0 must be a positive integer or -1") as err:
        S.make_mesh(tensor=0)
    assert err.value.settings == ("tensor=0",)       # the setting, for a front end to name its own way
    with pytest.raises(ValueError, match=r"no devices"):
        S.make_mesh(devices=[])


def test_parse_mesh_shape():
    assert S.parse_mesh_shape("1x1x8") == (1, 1, 8)
    assert S.parse_mesh_shape(" 2X4x-1 ") == (2, 4, -1)
    for bad in ("8", "1x8", "axbxc", "1x1x1x1"):
        with pytest.raises(ArgumentError, match=f"^mesh={bad!r}: expected a mesh shape DATAxFSDPxTENSOR"):
            S.parse_mesh_shape(bad)
    with pytest.raises(ArgumentError, match=r"^mesh='1x0x8': fsdp=0 must be a positive integer or -1 \(the rest"):
        S.parse_mesh_shape("1x0x8")
    # Without devices (a plan), -1 means nothing: the error says so without offering it.
    assert S.parse_mesh_shape("2x4x1", allow_rest=False) == (2, 4, 1)
    for bad, axis in (("1x-1x1", "fsdp=-1"), ("0x1x1", "data=0")):
        with pytest.raises(ArgumentError, match=f"^mesh={bad!r}: {axis} must be a positive integer$"):
            S.parse_mesh_shape(bad, allow_rest=False)
    with pytest.raises(ArgumentError, match=r"^fsdp=-1 must be a positive integer$"):
        S.abstract_mesh(1, -1, 1)


# --------------------------------------------------------------------------- resolver


def test_resolver_prefers_heads_then_falls_back_to_head_dim():
    axes = ("embed", "heads", "head_dim")
    assert S.logical_to_spec(axes, (3584, 28, 128), {"tensor": 4}) == P(None, "tensor", None)
    assert S.logical_to_spec(axes, (3584, 28, 128), {"tensor": 8}) == P(None, None, "tensor")
    # neither heads (28) nor head_dim (12) divide 8: the width takes it
    assert S.logical_to_spec(axes, (336, 28, 12), {"tensor": 8}) == P("tensor", None, None)
    # nothing divides 5: replicated
    assert S.logical_to_spec(axes, (336, 28, 12), {"tensor": 5}) == P(None, None, None)


def test_resolver_vocab_then_embed_and_mesh_axis_used_once():
    assert S.logical_to_spec(("vocab", "embed"), (151666, 3584), {"fsdp": 2, "tensor": 2}) == P("tensor", "fsdp")
    assert S.logical_to_spec(("vocab", "embed"), (151666, 3584), {"fsdp": 2, "tensor": 4}) == P(None, FT)
    assert S.logical_to_spec(("embed", "vocab"), (3584, 151666), {"fsdp": 1, "tensor": 8}) == P("tensor", None)
    # two dimensions with the same logical name: the first that divides gets the axis, never both
    assert S.logical_to_spec(("embed", "embed"), (6, 8), {"fsdp": 4}) == P(None, "fsdp")
    # fsdp alone divides, fsdp × tensor does not: only fsdp
    assert S.logical_to_spec(("embed",), (12,), {"fsdp": 2, "tensor": 8}) == P("fsdp")


def test_resolver_skips_size_one_and_missing_axes_and_knows_replicated_names():
    assert S.logical_to_spec(("batch", "length"), (8, 5), (1, 1, 1)) == P(None, None)
    assert S.logical_to_spec(("batch", "length"), (8, 5), {"data": 2, "fsdp": 4}) == P(("data", "fsdp"), None)
    assert S.logical_to_spec(("batch", "length"), (2, 5), {"data": 2, "fsdp": 4}) == P("data", None)
    assert S.logical_to_spec(("batch", "length"), (4, 5), {"data": 8, "fsdp": 4}) == P("fsdp", None)
    assert S.logical_to_spec(("norm",), (3584,), (1, 8, 8)) == P(None)
    assert S.logical_to_spec((None, "mlp"), (7, 16), {"model": 4, "tensor": 2}) == P(None, "tensor")


def test_resolver_errors():
    with pytest.raises(ValueError, match=r"logical axis 'embd' .* has no rule"):
        S.logical_to_spec(("embd", "mlp"), (8, 8), (1, 1, 2))
    with pytest.raises(ValueError, match=r"do not match shape"):
        S.logical_to_spec(("embed",), (8, 8), (1, 1, 2))


def test_custom_rules_table():
    rules = (("embed", "tensor"), ("mlp", ()))
    assert S.logical_to_spec(("embed", "mlp"), (8, 16), (1, 2, 2), rules) == P("tensor", None)
    with pytest.raises(ValueError, match="expected"):
        S.check_rules((("embed",),))


def test_every_logical_name_has_a_rule():
    ruled = {name for name, _ in S.RULES}
    assert set(S.LOGICAL_AXES) | set(S.ACTIVATION_AXES) | set(S.CACHE_AXES) <= ruled


# --------------------------------------------------------------------------- golden specs


@pytest.fixture(scope="module")
def full_state():
    return memory_plan.abstract_params(minicpmv_2_6())      # eval_shape: no weights materialised


def test_full_size_params_all_declare_known_axes(full_state):
    flat = nnx.to_flat_state(full_state)
    assert len(flat) > 700
    for path, var in flat:
        axes = var.get_metadata()["out_sharding"]
        assert set(axes) <= set(S.LOGICAL_AXES), path


# name → (path, {mesh: spec}); the specs follow from the rules and the sizes in the module docstring.
R = P(None)
FULL_GOLDEN = {
    "embedding": (("llm", "embed_tokens", "embedding"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, "fsdp"), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P("tensor", "fsdp"), (1, 2, 4): P(None, FT)}),
    "lm_head": (("llm", "lm_head", "kernel"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P("fsdp", None), (1, 1, 8): P("tensor", None),
        (2, 2, 2): P("fsdp", "tensor"), (1, 2, 4): P(FT, None)}),
    "q": (("llm", "layers", 0, "attn", "q", "kernel"), {
        (8, 1, 1): P(None, None, None), (1, 8, 1): P("fsdp", None, None), (1, 1, 8): P(None, None, "tensor"),
        (2, 2, 2): P("fsdp", "tensor", None), (1, 2, 4): P("fsdp", "tensor", None)}),
    "q_bias": (("llm", "layers", 0, "attn", "q", "bias"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, None), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P("tensor", None), (1, 2, 4): P("tensor", None)}),
    "k": (("llm", "layers", 3, "attn", "k", "kernel"), {
        (8, 1, 1): P(None, None, None), (1, 8, 1): P("fsdp", None, None), (1, 1, 8): P(None, None, "tensor"),
        (2, 2, 2): P("fsdp", "tensor", None), (1, 2, 4): P("fsdp", "tensor", None)}),
    "o": (("llm", "layers", 27, "attn", "o", "kernel"), {
        (8, 1, 1): P(None, None, None), (1, 8, 1): P(None, None, "fsdp"), (1, 1, 8): P(None, "tensor", None),
        (2, 2, 2): P("tensor", None, "fsdp"), (1, 2, 4): P("tensor", None, "fsdp")}),
    "gate": (("llm", "layers", 0, "mlp", "gate", "kernel"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P("fsdp", None), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P("fsdp", "tensor"), (1, 2, 4): P("fsdp", "tensor")}),
    "down": (("llm", "layers", 0, "mlp", "down", "kernel"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, "fsdp"), (1, 1, 8): P("tensor", None),
        (2, 2, 2): P("tensor", "fsdp"), (1, 2, 4): P("tensor", "fsdp")}),
    "norm": (("llm", "norm", "weight"), {m: R for m in MESHES}),
    "pos_embed": (("vpm", "pos_embed"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, "fsdp"), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P(None, FT), (1, 2, 4): P(None, FT)}),
    "patch_embed": (("vpm", "patch_embed", "kernel"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, "fsdp"), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P(None, FT), (1, 2, 4): P(None, FT)}),
    "vision_q": (("vpm", "layers", 0, "attn", "q", "kernel"), {
        (8, 1, 1): P(None, None, None), (1, 8, 1): P("fsdp", None, None), (1, 1, 8): P(None, "tensor", None),
        (2, 2, 2): P("fsdp", "tensor", None), (1, 2, 4): P("fsdp", "tensor", None)}),
    "vision_o": (("vpm", "layers", 25, "attn", "o", "kernel"), {
        (8, 1, 1): P(None, None, None), (1, 8, 1): P(None, None, "fsdp"), (1, 1, 8): P("tensor", None, None),
        (2, 2, 2): P("tensor", None, "fsdp"), (1, 2, 4): P("tensor", None, "fsdp")}),
    "fc1": (("vpm", "layers", 0, "mlp", "fc1", "kernel"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P("fsdp", None), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P("fsdp", "tensor"), (1, 2, 4): P("fsdp", "tensor")}),
    "fc1_bias": (("vpm", "layers", 0, "mlp", "fc1", "bias"), {
        (8, 1, 1): R, (1, 8, 1): R, (1, 1, 8): P("tensor"), (2, 2, 2): P("tensor"), (1, 2, 4): P("tensor")}),
    "ln1": (("vpm", "layers", 0, "ln1", "scale"), {
        (8, 1, 1): R, (1, 8, 1): P("fsdp"), (1, 1, 8): P("tensor"), (2, 2, 2): P(FT), (1, 2, 4): P(FT)}),
    "query": (("resampler", "query"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, "fsdp"), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P(None, FT), (1, 2, 4): P(None, FT)}),
    "kv_proj": (("resampler", "kv_proj", "kernel"), {         # ("vision_embed", "embed"): embed ranks first
        (8, 1, 1): P(None, None), (1, 8, 1): P(None, "fsdp"), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P(None, FT), (1, 2, 4): P(None, FT)}),
    "resampler_q": (("resampler", "q", "kernel"), {
        (8, 1, 1): P(None, None, None), (1, 8, 1): P("fsdp", None, None), (1, 1, 8): P(None, None, "tensor"),
        (2, 2, 2): P("fsdp", "tensor", None), (1, 2, 4): P("fsdp", "tensor", None)}),
    "proj": (("resampler", "proj"), {
        (8, 1, 1): P(None, None), (1, 8, 1): P("fsdp", None), (1, 1, 8): P(None, "tensor"),
        (2, 2, 2): P("fsdp", "tensor"), (1, 2, 4): P("fsdp", "tensor")}),
}


@pytest.mark.parametrize("shape", MESHES, ids=_mesh_id)
def test_golden_specs_full_size(full_state, shape):
    specs = dict(nnx.to_flat_state(S.param_specs(full_state, S.abstract_mesh(*shape))))
    for name, (path, expected) in FULL_GOLDEN.items():
        assert specs[path].get_value() == expected[shape], (name, shape, specs[path].get_value())
    # every 28 layers alike
    assert {specs[("llm", "layers", i, "attn", "q", "kernel")].get_value() for i in range(28)} == \
        {FULL_GOLDEN["q"][1][shape]}


TINY_GOLDEN = {   # (1, 1, 8) and (1, 2, 4), where the tiny sizes take other fallbacks than the full ones
    ("llm", "layers", 0, "attn", "q", "kernel"): {(1, 1, 8): P(None, None, "tensor"),
                                                   (1, 2, 4): P("fsdp", "tensor", None)},
    ("llm", "layers", 0, "attn", "k", "kernel"): {(1, 1, 8): P(None, None, "tensor"),
                                                   (1, 2, 4): P("fsdp", None, "tensor")},   # K = 2
    ("llm", "embed_tokens", "embedding"): {(1, 1, 8): P(None, "tensor"), (1, 2, 4): P(None, FT)},
    ("llm", "layers", 2, "mlp", "up", "kernel"): {(1, 1, 8): P(None, "tensor"), (1, 2, 4): P("fsdp", "tensor")},
    ("vpm", "layers", 0, "attn", "q", "kernel"): {(1, 1, 8): P(None, None, "tensor"),          # 3 heads
                                                  (1, 2, 4): P("fsdp", None, "tensor")},
    ("vpm", "layers", 1, "mlp", "fc1", "kernel"): {(1, 1, 8): P(None, "tensor"), (1, 2, 4): P("fsdp", "tensor")},
    ("vpm", "pos_embed"): {(1, 1, 8): P(None, "tensor"), (1, 2, 4): P(None, FT)},
    ("resampler", "k", "kernel"): {(1, 1, 8): P(None, None, "tensor"),                        # 1 head
                                   (1, 2, 4): P("fsdp", None, "tensor")},
}


@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 2, 4)], ids=_mesh_id)
def test_golden_specs_tiny(shape):
    abstract = nnx.eval_shape(lambda: MiniCPMV(tiny(), dtype=jnp.float32, rngs=nnx.Rngs(0)))
    specs = dict(nnx.to_flat_state(S.param_specs(abstract, shape)))
    for path, expected in TINY_GOLDEN.items():
        assert specs[path].get_value() == expected[shape], path


# --------------------------------------------------------------------------- placement of the tiny model


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny MiniCPMV (float32) with random weights: built with ``nnx.eval_shape`` and filled from numpy,
    because the eager random init compiles a program per parameter shape (~8 s on 2 cores)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MiniCPMV(tiny(), dtype=jnp.float32, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        value = rng.standard_normal(shape, np.float32)
        if len(shape) >= 2 and path[-1] != "embedding":
            value *= shape[0] ** -0.5                                    # ~ 1/sqrt(fan-in)
        elif len(shape) == 1:
            value = 0.5 * value + (1.0 if path[-1] in ("weight", "scale") else 0.0)
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def host_params(tiny_model):
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(tiny_model, nnx.Param))}


@pytest.fixture(scope="module")
def llm_reference(tiny_model):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, tiny_model.config.llm.vocab_size, (8, 7)).astype(np.int32)
    mask = np.ones((8, 7), bool)
    mask[1, :3] = mask[5, :6] = False                                   # left padding
    graphdef, state = nnx.split(tiny_model.llm)
    return ids, mask, np.asarray(_llm_logits(graphdef, state, ids, mask))


def _llm_logits(graphdef, state, ids, mask):
    return jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)


@pytest.fixture(scope="module", params=MESHES, ids=_mesh_id)
def placed(request, tiny_model):
    """(mesh shape, a copy of the tiny model with its parameters placed on that mesh)."""
    mesh = S.make_mesh(*request.param)
    graphdef, state = nnx.split(tiny_model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))       # new Variables, same arrays
    return request.param, mesh, S.shard_model(copy, mesh)


def test_shard_model_splits_every_matrix(placed, tiny_model, host_params):
    """Every weight matrix of all three towers ends up in fsdp × tensor pieces (data replicates): with
    the tiny sizes every matrix has a width axis that fsdp × tensor divides, and tensor always finds a
    divisible axis (module docstring). The [N, H] attention biases are split by tensor only. A
    replicated matrix fails here."""
    (d, f, t), mesh, model = placed
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) == len(host_params)
    checked = 0
    for path, var in flat:
        arr = var.get_value()
        assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh, path
        np.testing.assert_array_equal(np.asarray(arr), host_params[path], err_msg=str(path))
        shards = arr.addressable_shards
        assert len(shards) == 8
        if arr.ndim < 2:
            continue
        # attention biases [N, H] have no width axis: tensor only; every other matrix fsdp × tensor
        pieces = t if path[-1] == "bias" else f * t
        assert {s.data.nbytes for s in shards} == {arr.nbytes // pieces}, (path, arr.sharding.spec)
        assert len({tuple((i.start, i.stop) for i in s.index) for s in shards}) == pieces, path
        checked += 1
    assert checked > 40
    # the unsharded model was not touched
    assert isinstance(tiny_model.llm.lm_head.kernel[...].sharding, jax.sharding.SingleDeviceSharding)


def test_placement_matches_the_plan(placed):
    """The planner's per-device bytes equal what device 0 really holds after shard_model."""
    shape, mesh, model = placed
    device = jax.devices()[0]
    held = sum(s.data.nbytes for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
               for s in var.get_value().addressable_shards if s.device == device)
    plan = memory_plan.plan_memory(tiny(), shape, dtype="float32")
    assert plan.param_bytes_per_device == held


def test_sharded_llm_forward_matches_unsharded(placed, llm_reference):
    shape, mesh, model = placed
    ids, mask, reference = llm_reference
    batch = S.shard_batch({"ids": ids, "mask": mask}, mesh)
    d, f, _ = shape
    assert batch["ids"].sharding.spec == P(("data", "fsdp") if d > 1 and f > 1 else "data" if d > 1
                                           else "fsdp" if f > 1 else None, None)
    graphdef, state = nnx.split(model.llm)
    # the way the model's jitted programs take their state: shardings as in_shardings / out_shardings
    params = S.param_shardings(model.llm, mesh)
    assert jax.tree.structure(params) == jax.tree.structure(state)
    ids_sharding = S.batch_sharding(ids.shape, mesh)
    out_sharding = S.batch_sharding(reference.shape, mesh)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m), in_shardings=(params, ids_sharding, ids_sharding),
                 out_shardings=out_sharding)
    out = fn(state, batch["ids"], batch["mask"])
    assert out.sharding == out_sharding
    logits = np.asarray(out)
    err = np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
    assert err <= 1e-5, (shape, err)


# --------------------------------------------------------------------------- trees for jit and loading


def test_shardings_trees_match_the_state_and_the_loaders_paths(tiny_model):
    mesh = S.make_mesh(1, 2, 4)
    state = nnx.state(tiny_model, nnx.Param)
    shardings = S.param_shardings(tiny_model, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    flat = S.flat_param_shardings(tiny_model, mesh)
    assert set(flat) == {path for path, _ in nnx.to_flat_state(state)}
    assert flat[("llm", "layers", 0, "attn", "k", "kernel")] == NamedSharding(mesh, P("fsdp", None, "tensor"))
    abstract = S.abstract_with_shardings(nnx.eval_shape(lambda: MiniCPMV(tiny(), dtype=jnp.bfloat16,
                                                                         rngs=nnx.Rngs(0))), mesh)
    for path, var in nnx.to_flat_state(abstract):
        leaf = var.get_value()
        assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.dtype == jnp.bfloat16, path
        assert leaf.sharding == flat[path], path


def test_param_without_logical_axes_is_an_error():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)))

    with pytest.raises(ValueError, match=r"parameter w \[4, 4\] has no logical axes"):
        S.param_specs(Bare(), (1, 1, 2))


# --------------------------------------------------------------------------- batch and KV cache


@pytest.mark.parametrize("shape, batch, expected", [
    ((1, 1, 8), 1, P(None, None, None, "tensor")),          # K = 4 does not divide 8: head_dim
    ((1, 2, 4), 1, P(None, None, "tensor", None)),          # B = 1: replicated over fsdp
    ((1, 2, 4), 8, P("fsdp", None, "tensor", None)),
    ((2, 2, 2), 8, P(("data", "fsdp"), None, "tensor", None)),
    ((2, 2, 2), 2, P("data", None, "tensor", None)),
    ((8, 1, 1), 8, P("data", None, None, None)),
    ((1, 8, 1), 4, P(None, None, None, None)),
], ids=str)
def test_kv_cache_spec_full_size(shape, batch, expected):
    llm = minicpmv_2_6().llm
    assert S.kv_cache_spec((batch, 4096, llm.num_key_value_heads, llm.head_dim), shape) == expected
    with pytest.raises(ValueError, match=r"a KV-cache buffer is \[B, S, K, H\], got shape \[8, 4096\]"):
        S.kv_cache_spec((8, 4096), shape)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2)], ids=_mesh_id)
def test_sharded_kv_cache_is_created_in_shards(shape):
    mesh = S.make_mesh(*shape)
    cfg = tiny().llm                                             # K = 2, H = 32
    cache = kv_cache.sharded_zeros(cfg, 4, 16, mesh, dtype=jnp.float32)
    assert isinstance(cache, KVCache) and len(cache.k) == len(cache.v) == cfg.num_hidden_layers
    expected = {(1, 1, 8): (4, 16, 2, 4), (2, 2, 2): (1, 16, 1, 32)}[shape]
    for buf in (*cache.k, *cache.v):
        assert buf.shape == (4, 16, 2, 32)
        assert {s.data.shape for s in buf.addressable_shards} == {expected}
        assert not np.asarray(buf).any()
    shardings = kv_cache.shardings(cache, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(cache)
    assert shardings.k[0] == cache.k[0].sharding
    # as jit in/out shardings of a step that writes into the cache
    step = jax.jit(lambda c: c.replace(k=tuple(b + 1 for b in c.k)), in_shardings=(shardings,),
                   out_shardings=shardings, donate_argnums=0)
    out = step(cache)
    assert out.k[1].sharding == shardings.k[1] and float(out.k[1][0, 0, 0, 0]) == 1.0


def test_batch_sharding_and_shard_batch():
    mesh = S.make_mesh(2, 2, 2)
    assert S.batch_spec((8, 5), mesh) == P(("data", "fsdp"), None)
    assert S.batch_spec((2, 5, 3), mesh) == P("data", None, None)
    assert S.batch_spec((3,), mesh) == P(None)
    out = S.shard_batch({"ids": np.zeros((4, 6), np.int32), "n": 3}, mesh)
    assert out["ids"].sharding == NamedSharding(mesh, P(("data", "fsdp"), None)) and out["n"] == 3


# --------------------------------------------------------------------------- activation constraints


def test_constrain_is_a_no_op_without_a_mesh_and_splits_inside_one():
    x = jnp.ones((8, 6, 128))
    assert S.constrain(x, ("batch", "length", "act_embed")) is x
    mesh = S.make_mesh(2, 1, 4)
    f = jax.jit(lambda a: S.constrain(a * 2, ("batch", "length", "act_mlp"), mesh))
    assert f(x).sharding.spec == P("data", None, "tensor")
    g = jax.jit(lambda a: S.constrain(a * 2, ("batch", "length", "act_heads")))
    with jax.set_mesh(mesh):
        assert g(x).sharding.spec == P("data", None, "tensor")
        assert g(jnp.ones((3, 6, 6))).sharding.spec == P()      # nothing divides: replicated
    cache = KVCache.zeros(tiny().llm, 2, 4, jnp.float32)
    h = jax.jit(lambda c: kv_cache.constrain(c))
    with S.use_mesh(mesh):                                      # read while tracing
        assert h(cache).k[0].sharding.spec == P("data", None, None, "tensor")
    assert all(a is b for a, b in zip(jax.tree.leaves(kv_cache.constrain(cache)), jax.tree.leaves(cache)))
