"""plan_memory: per-device bytes of the 8B model on a mesh, checked against a hand calculation.

The parameter count is written out from the tensor shapes of docs/model.md §2 (the vision tower holds the 26
layers that run); which parameters each mesh axis splits follows from the rules table:

* every weight matrix and every vector along the model width (LayerNorm, o/fc2/patch biases) has an
  ``embed`` / ``vision_embed`` axis, split by fsdp × tensor on all meshes tested here (3584, 1152 and the
  head/MLP/vocab sizes divide; tensor = 8 falls back to head_dim / embed, see sharding/rules.py);
* q/k/v biases ``[N, H]`` and the SigLIP fc1 bias ``[4304]`` have no width axis: tensor only;
* the Qwen2 RMSNorm weights (``norm``) are replicated.
"""

import pytest
from jax.sharding import PartitionSpec as P

from minicpmv_jax import memory_plan
from minicpmv_jax import sharding as S
from minicpmv_jax.config import minicpmv_2_6, tiny

# --- docs/model.md §2, by hand ------------------------------------------------------------------------------
V, D, F, L, KV = 151666, 3584, 18944, 28, 4 * 128
VD, VF, VL, PATCH, POS, Q = 1152, 4304, 26, 3 * 14 * 14, 70 * 70, 64

LLM_LAYER = (D * D + D) + 2 * (KV * D + KV) + D * D + 3 * F * D + 2 * D   # q, k, v, o, MLP, 2 norms
LLM = V * D + L * LLM_LAYER + D + V * D                                   # embed, layers, norm, lm_head
VISION_LAYER = 4 * (VD * VD + VD) + (VF * VD + VF) + (VD * VF + VD) + 4 * VD
VISION = VD * PATCH + VD + POS * VD + VL * VISION_LAYER + 2 * VD
RESAMPLER = Q * D + D * VD + (3 * D * D + 3 * D) + (D * D + D) + 6 * D + D * D
TOTAL = LLM + VISION + RESAMPLER

# (tensor-only, replicated) parameter counts per tower
SPLIT_BY_TENSOR_ONLY = {"llm": L * (D + 2 * KV), "vpm": VL * (3 * VD + VF), "resampler": 3 * D}
REPLICATED = {"llm": (2 * L + 1) * D, "vpm": 0, "resampler": 0}
TOWERS = {"llm": LLM, "vpm": VISION, "resampler": RESAMPLER}


def hand_per_device(tower: str, fsdp: int, tensor: int, itemsize: int = 2) -> int:
    total, t_only, rep = TOWERS[tower], SPLIT_BY_TENSOR_ONLY[tower], REPLICATED[tower]
    full_split = total - t_only - rep
    assert full_split % (fsdp * tensor) == 0 and t_only % tensor == 0
    return (full_split // (fsdp * tensor) + t_only // tensor + rep) * itemsize


def test_hand_count_is_the_8b_model():
    assert TOTAL == 8_083_935_648
    plan = memory_plan.plan_memory(minicpmv_2_6(), (1, 1, 1))
    assert plan.num_params == TOTAL
    assert {t.name: t.num_params for t in plan.towers} == TOWERS
    assert plan.param_bytes == plan.param_bytes_per_device == 2 * TOTAL


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4), (4, 16, 8)],
                         ids=lambda m: "x".join(map(str, m)))
def test_param_bytes_per_device_match_hand_calculation(mesh):
    _, f, t = mesh
    plan = memory_plan.plan_memory("minicpmv-2_6", mesh, dtype="bfloat16")   # (4, 16, 8): 512 devices, none needed
    assert plan.num_devices == mesh[0] * f * t
    for tower in plan.towers:
        assert tower.total_bytes == 2 * TOWERS[tower.name]
        assert tower.per_device_bytes == hand_per_device(tower.name, f, t), tower.name
    assert plan.param_bytes_per_device == sum(hand_per_device(n, f, t) for n in TOWERS)


def test_tensor_8_numbers_spelled_out():
    """tensor = 8: everything but the 57 RMSNorm weights is split 8 ways (heads fall back to head_dim,
    the vocabulary to embed)."""
    plan = memory_plan.plan_memory(minicpmv_2_6(), "1x1x8")
    norms = 57 * 3584
    assert plan.param_bytes_per_device == ((8_083_935_648 - norms) // 8 + norms) * 2 == 2_021_341_416
    llm = next(t for t in plan.towers if t.name == "llm")
    assert llm.replicated_bytes == norms * 2


@pytest.mark.parametrize("mesh, batch, length, pieces", [
    ((1, 1, 8), 1, 4096, 8),        # K = 4 does not divide 8: head_dim split 8 ways
    ((1, 8, 1), 1, 4096, 1),        # B = 1 cannot be split: a full cache on every device
    ((1, 8, 1), 8, 4096, 8),        # batch over fsdp
    ((8, 1, 1), 8, 2048, 8),        # batch over data
    ((2, 2, 2), 8, 8192, 8),        # batch over data × fsdp, K over tensor
    ((2, 2, 2), 2, 1000, 4),        # batch over data only (fsdp does not divide what is left)
    ((1, 2, 4), 3, 4096, 4),        # B = 3: K over tensor only
], ids=str)
def test_kv_cache_bytes_match_hand_calculation(mesh, batch, length, pieces):
    plan = memory_plan.plan_memory(minicpmv_2_6(), mesh, batch=batch, max_len=length)
    total = 2 * 28 * batch * length * 4 * 128 * 2          # K and V, layers, [B, S, K, H], bfloat16
    assert plan.kv_cache_bytes == total
    assert plan.kv_cache_bytes_per_device == total // pieces
    assert plan.bytes_per_device == plan.param_bytes_per_device + total // pieces


def test_dtypes():
    plan = memory_plan.plan_memory(minicpmv_2_6(), (1, 1, 8), batch=2, max_len=100, dtype="float32", kv_dtype="bfloat16")
    assert plan.param_bytes == 4 * TOTAL and plan.dtype == "float32" and plan.kv_dtype == "bfloat16"
    assert plan.kv_cache_bytes == 2 * 28 * 2 * 100 * 512 * 2
    assert plan.kv_cache_spec == P(None, None, None, "tensor")


def test_format_plan():
    plan = memory_plan.plan_memory(minicpmv_2_6(), (1, 2, 4), batch=4, max_len=8192)
    text = memory_plan.format_plan(plan, device_memory_gib=16)
    per_device = (sum(hand_per_device(n, 2, 4) for n in TOWERS) + 2 * 28 * 4 * 8192 * 512 * 2 // 8) / 2**30
    assert "data=1 × fsdp=2 × tensor=4 (8 devices)" in text
    assert "data=1 × fsdp=1 × tensor=1 (1 device)" in memory_plan.format_plan(memory_plan.plan_memory(tiny(), (1, 1, 1)))
    assert "8,083,935,648" in text
    assert f"{per_device:.2f} GiB" in text
    assert f"16 GiB per device: {16 - per_device:.2f} GiB left" in text
    over = memory_plan.format_plan(memory_plan.plan_memory(minicpmv_2_6(), (8, 1, 1)), device_memory_gib=8)
    assert "OVER the device memory" in over


def test_model_argument_forms(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps(tiny().to_hf_config()))
    by_path = memory_plan.plan_memory(str(tmp_path), (1, 2, 4), dtype="float32")
    assert by_path == memory_plan.plan_memory("tiny", (1, 2, 4), dtype="float32")
    assert by_path == memory_plan.plan_memory(tmp_path / "config.json", (1, 2, 4), dtype="float32")
    with pytest.raises(ValueError, match=r"^model='no/such/model': not a checkpoint folder"):
        memory_plan.plan_memory("no/such/model", (1, 1, 1))
    with pytest.raises(ValueError, match="mesh shape"):
        memory_plan.plan_memory("tiny", "1x8")
    with pytest.raises(ValueError, match=r"^mesh='1x-1x1': fsdp=-1 must be a positive integer$"):
        memory_plan.plan_memory("tiny", "1x-1x1")                 # no devices to take the rest of
    with pytest.raises(ValueError, match=r"^fsdp=-1 must be a positive integer$"):
        memory_plan.plan_memory("tiny", (1, -1, 1))
    with pytest.raises(ValueError, match="^batch=0 must be positive"):
        memory_plan.plan_memory("tiny", (1, 1, 1), batch=0)


def test_idle_axes_are_found_from_the_rules_and_shapes():
    """3 divides none of Qwen2-7B's split dimensions (but SigLIP's width 1152 and head size 72): each axis of a
    3x3x3 mesh leaves the LLM and/or the KV cache whole, and the plan says which dimensions it would split."""
    plan = memory_plan.plan_memory(minicpmv_2_6(), (3, 3, 3))
    assert plan.idle_axes == (
        memory_plan.IdleAxis("data", 3, ("kv_cache",), (("cache_batch", 1),)),
        memory_plan.IdleAxis("fsdp", 3, ("llm", "kv_cache"), (("embed", D), ("cache_batch", 1))),
        memory_plan.IdleAxis("tensor", 3, ("llm", "kv_cache"), (("vocab", V), ("embed", D), ("kv_heads", 4), ("head_dim", 128),
                                                      ("heads", 28), ("mlp", F), ("cache_kv_heads", 4),
                                                      ("cache_head_dim", 128))),
    )
    assert [i.dividing_sizes() for i in plan.idle_axes] == [(), (2, 4, 7, 8), (2, 4, 7, 8)]
    towers = {t.name: t for t in plan.towers}
    assert towers["llm"].per_device_bytes == towers["llm"].total_bytes
    assert towers["vpm"].per_device_bytes < towers["vpm"].total_bytes
    text = memory_plan.format_plan(plan)
    assert ("note: fsdp=3 divides none of the dimensions it would split (embed 3584, cache_batch 1), so llm (Qwen2) "
            "and the KV cache are replicated over it; sizes that divide some of them: 2, 4, 7, 8") in text.splitlines()
    # Every axis splits something of every tower and of the cache: no note.
    assert memory_plan.plan_memory(minicpmv_2_6(), (2, 2, 4), batch=4).idle_axes == ()
    assert "note:" not in memory_plan.format_plan(memory_plan.plan_memory(minicpmv_2_6(), (2, 2, 4), batch=4))
    # The rules decide what an axis would split: without fsdp for the vision width, the resampler (whose
    # other width, 3584, 3 does not divide) is left whole too.
    assert [(i.axis, i.arrays) for i in memory_plan.plan_memory(minicpmv_2_6(), (1, 3, 1), batch=3).idle_axes] == \
        [("fsdp", ("llm",))]
    rules = S.override_rules(S.RULES, {"vision_embed": ()})
    assert [(i.axis, i.arrays) for i in memory_plan.plan_memory(minicpmv_2_6(), (1, 3, 1), batch=3, rules=rules).idle_axes] \
        == [("fsdp", ("llm", "resampler"))]
