"""Loading HF-layout folders: single and sharded files, and every way a folder can be wrong."""

import json
import os

import numpy as np
import pytest

from minicpmv_jax import config as C
from minicpmv_jax.config import ConfigError
from minicpmv_jax.hf_checkpoint import CheckpointError
from minicpmv_jax import MiniCPMV
from minicpmv_jax.processor import MiniCPMVProcessor
from minicpmv_jax.testing.checkpoint import write_checkpoint

SMALL = C.tiny(vocab_size=1009, num_layers=2, vision_layers=2)


def _write(folder, **kw):
    kw.setdefault("tokenizer", False)
    return write_checkpoint(folder, SMALL, seed=3, **kw)


@pytest.mark.parametrize("num_shards", [1, 4])
def test_single_and_sharded_load_the_same_values(tmp_path, num_shards):
    tensors = _write(tmp_path, num_shards=num_shards)
    assert os.path.exists(tmp_path / ("model.safetensors" if num_shards == 1 else "model.safetensors.index.json"))
    m = MiniCPMV.from_pretrained(tmp_path, dtype="float32")
    q = tensors["llm.model.layers.1.self_attn.q_proj.weight"]          # [N·H, D]
    np.testing.assert_array_equal(np.asarray(m.llm.layers[1].attn.q.kernel[...]),
                                  q.T.reshape(SMALL.llm.hidden_size, SMALL.llm.num_attention_heads, -1))
    o = tensors["llm.model.layers.0.self_attn.o_proj.weight"]          # [D, N·H]
    np.testing.assert_array_equal(np.asarray(m.llm.layers[0].attn.o.kernel[...]).reshape(-1, o.shape[0]), o.T)
    np.testing.assert_array_equal(np.asarray(m.llm.embed_tokens.embedding[...]),
                                  tensors["llm.model.embed_tokens.weight"])


def test_missing_tensor_names_it(tmp_path):
    _write(tmp_path, num_shards=1)
    from safetensors.numpy import load_file, save_file
    data = load_file(tmp_path / "model.safetensors")
    del data["llm.model.layers.1.mlp.up_proj.weight"]
    save_file(data, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"llm\.model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_unexpected_tensor_names_it_and_file(tmp_path):
    _write(tmp_path, num_shards=1, tensors={"llm.model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                                              r"llm\.model\.layers\.0\.self_attn\.rotary\.inv_freq"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    _write(tmp_path, num_shards=2, tensors={"llm.model.norm.weight": np.ones(127, np.float32)})
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002\.safetensors: tensor llm\.model\.norm\.weight "
                                              r"has shape \[127\], expected \[128\]"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_vision_and_resampler_tensors_are_checked_too(tmp_path):
    _write(tmp_path, num_shards=1, tensors={"resampler.proj": np.ones((128, 127), np.float32)})
    with pytest.raises(CheckpointError, match=r"resampler\.proj has shape \[128, 127\]"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_extra_vision_layer_is_reported_not_used(tmp_path):
    _write(tmp_path, num_shards=1, vision_layers=SMALL.num_vision_layers + 1)
    with pytest.warns(UserWarning, match=r"vpm\.encoder\.layers\.1\."):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_index_pointing_at_missing_file(tmp_path):
    _write(tmp_path, num_shards=3)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"points at model-00002-of-00003\.safetensors, which does not exist"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_truncated_file_is_named(tmp_path):
    _write(tmp_path, num_shards=3)
    shard = tmp_path / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_corrupt_header_is_named(tmp_path):
    _write(tmp_path, num_shards=1)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_no_weights_at_all(tmp_path):
    _write(tmp_path, num_shards=1)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_config_that_does_not_match_tensors(tmp_path):
    _write(tmp_path, num_shards=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 345
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \[344, 128\], expected \[345, 128\]"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


@pytest.mark.parametrize("key,value,message", [
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_act", "gelu", "hidden_act"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("hidden_size", "wide", "hidden_size must be int"),
    ("model_type", "llava", "model_type"),
])
def test_bad_config_values_name_the_key(tmp_path, key, value, message):
    _write(tmp_path, num_shards=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        MiniCPMV.from_pretrained(tmp_path, dtype="float32")


def test_bad_dtype_and_path(tmp_path):
    _write(tmp_path, num_shards=1)
    with pytest.raises(ValueError, match=r"dtype='float8'"):
        MiniCPMV.from_pretrained(tmp_path, dtype="float8")
    with pytest.raises(CheckpointError, match="nope: no such folder"):
        MiniCPMV.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json: not a directory"):
        MiniCPMV.from_pretrained(tmp_path / "config.json")


def test_from_pretrained_expands_the_home_folder(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "MiniCPM-V-2_6").symlink_to(tiny_checkpoint[0])
    model = MiniCPMV.from_pretrained("~/MiniCPM-V-2_6", dtype="float32")
    np.testing.assert_array_equal(np.asarray(model.llm.embed_tokens.embedding[...]),
                                  tiny_checkpoint[1]["llm.model.embed_tokens.weight"])
    processor = MiniCPMVProcessor.from_pretrained("~/MiniCPM-V-2_6")
    assert processor.tokenizer.vocab_size == MiniCPMVProcessor.from_pretrained(tiny_checkpoint[0]).tokenizer.vocab_size


def test_the_demo_model_from_python(tmp_path, monkeypatch):
    from minicpmv_jax.demo import demo_config

    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    model = MiniCPMV.from_pretrained("demo", dtype="float32")
    processor = MiniCPMVProcessor.from_pretrained("demo")
    assert model.config == demo_config() and (tmp_path / "cache" / "demo-v1" / "config.json").is_file()
    answer = model.chat(msgs=[{"role": "user", "content": "Hello"}], processor=processor, sampling=False,
                        num_beams=1, max_new_tokens=3)
    assert isinstance(answer, str)


def test_vision_and_resampler_tensors_land_in_their_parameters(tmp_path):
    """The HF folder's vpm/resampler tensors reach the right parameters through the name table."""
    tensors = _write(tmp_path, num_shards=3)
    m = MiniCPMV.from_pretrained(tmp_path, dtype="float32")
    d, n = SMALL.resampler.embed_dim, SMALL.resampler.num_heads
    in_proj = tensors["resampler.attn.in_proj_weight"]
    np.testing.assert_array_equal(np.asarray(m.resampler.k.kernel[...]), in_proj[d:2 * d].T.reshape(d, n, -1))
    np.testing.assert_array_equal(np.asarray(m.resampler.v.bias[...]),
                                  tensors["resampler.attn.in_proj_bias"][2 * d:].reshape(n, -1))
    np.testing.assert_array_equal(np.asarray(m.resampler.proj[...]), tensors["resampler.proj"])
    conv = tensors["vpm.embeddings.patch_embedding.weight"]
    np.testing.assert_array_equal(np.asarray(m.vpm.patch_embed.kernel[...]), conv.reshape(conv.shape[0], -1).T)
    last = SMALL.num_vision_layers - 1
    np.testing.assert_array_equal(np.asarray(m.vpm.layers[last].mlp.fc2.kernel[...]),
                                  tensors[f"vpm.encoder.layers.{last}.mlp.fc2.weight"].T)
    assert len(m.vpm.layers) == SMALL.num_vision_layers


def test_hub_ids_download_what_each_loader_needs(tmp_path, monkeypatch, tiny_checkpoint):
    """A Hub id: the processor fetches only config and tokenizer files, the model its weights too, and a
    folder the command line converted earlier is used instead of any download."""
    import huggingface_hub

    from minicpmv_jax.hub import converted_cache_dir

    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, sorted(allow_patterns)))
        return tiny_checkpoint[0]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    MiniCPMVProcessor.from_pretrained("someone/tiny")
    model = MiniCPMV.from_pretrained("someone/tiny", dtype="float32")
    assert asked == [("someone/tiny", ["*.jinja", "*.json", "*.txt"]),
                     ("someone/tiny", ["*.jinja", "*.json", "*.safetensors", "*.txt", "model.safetensors.index.json"])]
    np.testing.assert_array_equal(np.asarray(model.llm.embed_tokens.embedding[...]),
                                  tiny_checkpoint[1]["llm.model.embed_tokens.weight"])
    from minicpmv_jax.convert_weights import convert

    os.makedirs(os.path.dirname(converted_cache_dir("someone/tiny")))
    convert(tiny_checkpoint[0], converted_cache_dir("someone/tiny"))
    asked.clear()
    MiniCPMV.from_pretrained("someone/tiny", dtype="float32")
    MiniCPMVProcessor.from_pretrained("someone/tiny")
    assert asked == []
