"""Configs: built from config.json, round-tripped, and refusing what they cannot honour."""

import json

import pytest

from minicpmv_jax import config as C


def test_released_preset_matches_design():
    cfg = C.minicpmv_2_6()
    assert (cfg.llm.hidden_size, cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads) == (3584, 28, 4)
    assert cfg.llm.head_dim == 128 and cfg.llm.num_groups == 7
    assert cfg.vision.head_dim == 72 and cfg.vision.num_patches_per_side == 70 and cfg.vision.patch_dim == 588
    assert cfg.resampler.num_heads == 28 and cfg.num_vision_layers == 26
    assert 8.0e9 < C.num_parameters(cfg) < 8.2e9


@pytest.mark.parametrize("make", [C.minicpmv_2_6, C.tiny])
def test_hf_round_trip(make):
    cfg = make()
    assert C.MiniCPMVConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_released_config_json_shape(tmp_path):
    """A config.json as released (bookkeeping keys, vision_config without eps/act) parses."""
    hf = {
        "_name_or_path": "openbmb/MiniCPM-V-2_6", "architectures": ["MiniCPMV"], "auto_map": {},
        "batch_vision_input": True, "bos_token_id": 151643, "drop_vision_last_layer": False,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "image_size": 448,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "minicpmv", "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "patch_size": 14, "query_num": 64,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv", "patch_size": 14, "scale_resolution": 448},
        "slice_mode": True, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0", "use_cache": True, "use_image_id": True, "use_sliding_window": False,
        "vision_batch_size": 16, "version": 2.6, "vocab_size": 151666,
        "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                          "model_type": "siglip", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14},
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = C.MiniCPMVConfig.from_pretrained(tmp_path)
    assert cfg.vision.layer_norm_eps == 1e-6 and cfg.num_vision_layers == 27
    assert cfg.llm.rope_theta == 1e6 and cfg.slicing.max_slice_nums == 9


def test_unknown_key_warns(tmp_path):
    hf = C.tiny().to_hf_config()
    hf["frobnicate"] = 1
    with pytest.warns(UserWarning, match="frobnicate"):
        C.MiniCPMVConfig.from_hf_config(hf)


@pytest.mark.parametrize("mutate,message", [
    (lambda h: h.update(hidden_size=130), "hidden_size"),
    (lambda h: h["vision_config"].update(patch_size=16), "patch_size"),
    (lambda h: h["slice_config"].update(patch_size=16), "slice_config: patch_size"),
    (lambda h: h.update(rope_scaling={"type": "yarn"}), "rope_scaling"),
    (lambda h: h.update(use_sliding_window=True), "use_sliding_window"),
    (lambda h: h.pop("vocab_size"), "vocab_size is missing"),
    (lambda h: h.update(query_num=0), "query_num"),
    (lambda h: h["vision_config"].update(hidden_act="relu"), "vision_config: hidden_act"),
])
def test_inconsistent_values_name_the_key(mutate, message):
    hf = C.tiny().to_hf_config()
    mutate(hf)
    with pytest.raises(C.ConfigError, match=message):
        C.MiniCPMVConfig.from_hf_config(hf)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(C.ConfigError, match="no such file"):
        C.MiniCPMVConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(C.ConfigError, match="not valid JSON"):
        C.MiniCPMVConfig.from_pretrained(tmp_path)
