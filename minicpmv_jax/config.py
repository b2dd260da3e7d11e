"""Typed, frozen configurations for the three towers of MiniCPM-V 2.6 and the whole model.

Every config is built from a checkpoint's ``config.json`` by ``from_hf_config`` (the checkpoint is the
source of truth, see docs/model.md). Values we cannot honour raise :class:`ConfigError` naming the key;
keys we do not know at all are reported once with a warning and otherwise ignored (real checkpoints
carry bookkeeping keys such as ``auto_map`` or ``transformers_version``).

Presets: :func:`minicpmv_2_6` (the released sizes) and :func:`tiny` (small sizes for tests; hidden ≥ 128
so the resampler has whole 128-wide heads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "Qwen2Config",
    "VisionConfig",
    "ResamplerConfig",
    "SliceConfig",
    "MiniCPMVConfig",
    "minicpmv_2_6",
    "tiny",
]


class ConfigError(ValueError):
    """A ``config.json`` value that is missing, unsupported or inconsistent with another one."""


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _get(cfg: Mapping[str, Any], key: str, kind: type, source: str | None, default: Any = ...) -> Any:
    """Reads ``cfg[key]`` as ``kind``; a missing key without default or a wrong type is a ConfigError."""
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ConfigError(f"{_where(source, key)} is missing")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{_where(source, key)} must be {kind.__name__}, got {value!r}")
    return value


def _require(condition: bool, source: str | None, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{_where(source, key)}: {message}")


def _positive(cfg: Mapping[str, Any], key: str, source: str | None, default: Any = ...) -> int:
    value = _get(cfg, key, int, source, default)
    _require(value > 0, source, key, f"must be a positive integer, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The Qwen2 language model (docs/model.md §5)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    def __post_init__(self):
        _require(self.hidden_size % self.num_attention_heads == 0, None, "hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, None, "num_key_value_heads",
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, None, "hidden_size",
                 f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per K/V head (G)."""
        return self.num_attention_heads // self.num_key_value_heads

    # Keys that change the maths and that this implementation does not support (key -> allowed value).
    _UNSUPPORTED = {
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "rope_scaling": None,
        "hidden_act": "silu",
    }

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str | None = None) -> "Qwen2Config":
        for key, allowed in cls._UNSUPPORTED.items():
            if key in cfg and cfg[key] != allowed:
                raise ConfigError(f"{_where(source, key)}={cfg[key]!r} is not supported (expected {allowed!r})")
        if "head_dim" in cfg and cfg["head_dim"] is not None:
            hd = _positive(cfg, "head_dim", source)
            _require(hd * _positive(cfg, "num_attention_heads", source) == _positive(cfg, "hidden_size", source),
                     source, "head_dim", f"{hd} × num_attention_heads != hidden_size")
        return cls(
            vocab_size=_positive(cfg, "vocab_size", source),
            hidden_size=_positive(cfg, "hidden_size", source),
            intermediate_size=_positive(cfg, "intermediate_size", source),
            num_hidden_layers=_positive(cfg, "num_hidden_layers", source),
            num_attention_heads=_positive(cfg, "num_attention_heads", source),
            num_key_value_heads=_positive(cfg, "num_key_value_heads", source,
                                          cfg.get("num_attention_heads", ...)),
            rope_theta=_get(cfg, "rope_theta", float, source, 1e6),
            rms_norm_eps=_get(cfg, "rms_norm_eps", float, source, 1e-6),
            max_position_embeddings=_positive(cfg, "max_position_embeddings", source, 32768),
        )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision encoder (docs/model.md §3). ``num_hidden_layers`` is what the config declares."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 980
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _require(self.hidden_size % self.num_attention_heads == 0, "vision_config", "hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        _require(self.image_size % self.patch_size == 0, "vision_config", "image_size",
                 f"{self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        """Side of the square position-embedding table (70 for the released model)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.num_patches_per_side ** 2

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, C·P·P (588)."""
        return self.num_channels * self.patch_size ** 2

    _ACTIVATIONS = ("gelu_pytorch_tanh",)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str | None = "vision_config") -> "VisionConfig":
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        _require(act in cls._ACTIVATIONS, source, "hidden_act", f"{act!r} is not supported (expected gelu_pytorch_tanh)")
        return cls(
            hidden_size=_positive(cfg, "hidden_size", source, 1152),
            intermediate_size=_positive(cfg, "intermediate_size", source, 4304),
            num_hidden_layers=_positive(cfg, "num_hidden_layers", source, 27),
            num_attention_heads=_positive(cfg, "num_attention_heads", source, 16),
            image_size=_positive(cfg, "image_size", source, 980),
            patch_size=_positive(cfg, "patch_size", source, 14),
            num_channels=_positive(cfg, "num_channels", source, 3),
            layer_norm_eps=_get(cfg, "layer_norm_eps", float, source, 1e-6),
        )


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """The perceiver resampler (docs/model.md §4): ``num_queries`` learned queries, heads of 128."""

    num_queries: int
    embed_dim: int
    kv_dim: int
    head_dim: int = 128
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _require(self.embed_dim % self.head_dim == 0, None, "hidden_size",
                 f"the resampler needs hidden_size divisible by {self.head_dim}, got {self.embed_dim}")

    @property
    def num_heads(self) -> int:
        return self.embed_dim // self.head_dim


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """Image slicing (docs/model.md §6)."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str | None = "slice_config") -> "SliceConfig":
        return cls(
            max_slice_nums=_positive(cfg, "max_slice_nums", source, 9),
            scale_resolution=_positive(cfg, "scale_resolution", source, 448),
            patch_size=_positive(cfg, "patch_size", source, 14),
        )


@dataclasses.dataclass(frozen=True)
class MiniCPMVConfig:
    """The whole model: Qwen2 + SigLIP + resampler + slicing."""

    llm: Qwen2Config
    vision: VisionConfig
    resampler: ResamplerConfig
    slicing: SliceConfig
    use_image_id: bool = True
    drop_vision_last_layer: bool = False
    slice_mode: bool = True

    def __post_init__(self):
        _require(self.resampler.embed_dim == self.llm.hidden_size, None, "hidden_size",
                 "resampler width must equal the language model's hidden_size")
        _require(self.resampler.kv_dim == self.vision.hidden_size, "vision_config", "hidden_size",
                 "resampler kv width must equal the vision hidden_size")
        _require(self.slicing.patch_size == self.vision.patch_size, "slice_config", "patch_size",
                 f"{self.slicing.patch_size} differs from vision_config.patch_size={self.vision.patch_size}")
        _require(self.num_vision_layers >= 1, "vision_config", "num_hidden_layers",
                 "no vision layer is left once drop_vision_last_layer is applied")

    @property
    def num_vision_layers(self) -> int:
        """Encoder layers that actually run (one fewer when ``drop_vision_last_layer``)."""
        return self.vision.num_hidden_layers - int(self.drop_vision_last_layer)

    @property
    def query_num(self) -> int:
        return self.resampler.num_queries

    # Keys read by from_hf_config, and bookkeeping keys that do not change the maths.
    _KNOWN = frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
        "tie_word_embeddings", "use_sliding_window", "rope_scaling", "hidden_act", "query_num",
        "patch_size", "use_image_id", "slice_config", "drop_vision_last_layer", "vision_config",
        "slice_mode", "model_type", "image_size", "version", "batch_vision_input", "vision_batch_size",
        # bookkeeping / generation-only / training-only keys
        "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version",
        "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
        "attention_dropout", "sliding_window", "max_window_layers", "im_start_token", "im_end_token",
        "slice_start_token", "slice_end_token", "unk_token", "stream_input", "layer_types",
    })

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str | None = "config.json") -> "MiniCPMVConfig":
        model_type = cfg.get("model_type", "minicpmv")
        _require(model_type == "minicpmv", source, "model_type", f"expected 'minicpmv', got {model_type!r}")
        unknown = sorted(set(cfg) - cls._KNOWN)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=2)
        vision_cfg = cfg.get("vision_config", {})
        _require(isinstance(vision_cfg, Mapping), source, "vision_config", "must be an object")
        slice_cfg = cfg.get("slice_config", {})
        _require(isinstance(slice_cfg, Mapping), source, "slice_config", "must be an object")
        src = lambda sub: f"{source}: {sub}" if source else sub  # noqa: E731
        llm = Qwen2Config.from_hf_config(cfg, source)
        vision = VisionConfig.from_hf_config(vision_cfg, src("vision_config"))
        patch_size = _positive(cfg, "patch_size", source, vision.patch_size)
        _require(patch_size == vision.patch_size, source, "patch_size",
                 f"{patch_size} differs from vision_config.patch_size={vision.patch_size}")
        return cls(
            llm=llm,
            vision=vision,
            resampler=ResamplerConfig(
                num_queries=_positive(cfg, "query_num", source, 64),
                embed_dim=llm.hidden_size,
                kv_dim=vision.hidden_size,
            ),
            slicing=SliceConfig.from_hf_config(slice_cfg, src("slice_config")),
            use_image_id=_get(cfg, "use_image_id", bool, source, True),
            drop_vision_last_layer=_get(cfg, "drop_vision_last_layer", bool, source, False),
            slice_mode=_get(cfg, "slice_mode", bool, source, True),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MiniCPMVConfig":
        """Reads ``path/config.json`` (or ``path`` itself when it is a file); ``~`` is expanded."""
        path = os.path.expanduser(os.fspath(path))
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such file (is this a MiniCPM-V checkpoint folder?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls.from_hf_config(cfg, source=file)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dictionary that :meth:`from_hf_config` reads back to this config."""
        llm, v = self.llm, self.vision
        return {
            "architectures": ["MiniCPMV"],
            "model_type": "minicpmv",
            "version": 2.6,
            "vocab_size": llm.vocab_size,
            "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_hidden_layers,
            "num_attention_heads": llm.num_attention_heads,
            "num_key_value_heads": llm.num_key_value_heads,
            "hidden_act": "silu",
            "rope_theta": llm.rope_theta,
            "rms_norm_eps": llm.rms_norm_eps,
            "max_position_embeddings": llm.max_position_embeddings,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "query_num": self.resampler.num_queries,
            "patch_size": v.patch_size,
            "use_image_id": self.use_image_id,
            "drop_vision_last_layer": self.drop_vision_last_layer,
            "slice_mode": self.slice_mode,
            "slice_config": {
                "model_type": "minicpmv",
                "max_slice_nums": self.slicing.max_slice_nums,
                "scale_resolution": self.slicing.scale_resolution,
                "patch_size": self.slicing.patch_size,
            },
            "vision_config": {
                "model_type": "siglip",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh",
            },
            "torch_dtype": "bfloat16",
        }


def minicpmv_2_6() -> MiniCPMVConfig:
    """The released MiniCPM-V 2.6 sizes (docs/model.md §2); the deployed model runs 26 vision layers."""
    llm = Qwen2Config(vocab_size=151666, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6)
    vision = VisionConfig()
    return MiniCPMVConfig(
        llm=llm,
        vision=vision,
        resampler=ResamplerConfig(num_queries=64, embed_dim=llm.hidden_size, kv_dim=vision.hidden_size),
        slicing=SliceConfig(),
        drop_vision_last_layer=True,
    )


def tiny(vocab_size: int = 151666, *, num_layers: int = 3, vision_layers: int = 3,
         hidden_size: int = 128, drop_vision_last_layer: bool = True) -> MiniCPMVConfig:
    """A small model for tests: odd/prime-ish sizes so that swapped axes fail loudly.

    The vocabulary defaults to the real MiniCPM-V size so the real tokenizer fits.
    """
    llm = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=344,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=1e6, rms_norm_eps=1e-6)
    vision = VisionConfig(hidden_size=48, intermediate_size=104, num_hidden_layers=vision_layers,
                          num_attention_heads=3, image_size=980, patch_size=14)
    return MiniCPMVConfig(
        llm=llm,
        vision=vision,
        resampler=ResamplerConfig(num_queries=64, embed_dim=llm.hidden_size, kv_dim=vision.hidden_size),
        slicing=SliceConfig(),
        drop_vision_last_layer=drop_vision_last_layer,
    )


def num_parameters(cfg: MiniCPMVConfig) -> int:
    """Parameter count implied by a config (all three towers, vision layers that run)."""
    l, v, r = cfg.llm, cfg.vision, cfg.resampler
    kv = l.num_key_value_heads * l.head_dim
    per_layer = (l.hidden_size * (l.hidden_size + 2 * kv) + l.hidden_size + 2 * kv   # q, k, v (+ biases)
                 + l.hidden_size ** 2 + 3 * l.hidden_size * l.intermediate_size + 2 * l.hidden_size)
    llm = 2 * l.vocab_size * l.hidden_size + l.num_hidden_layers * per_layer + l.hidden_size
    vis_layer = 4 * (v.hidden_size ** 2 + v.hidden_size) + 2 * v.hidden_size * v.intermediate_size \
        + v.intermediate_size + v.hidden_size + 4 * v.hidden_size
    vision = (v.patch_dim + 1) * v.hidden_size + v.num_positions * v.hidden_size \
        + cfg.num_vision_layers * vis_layer + 2 * v.hidden_size
    d = r.embed_dim
    resampler = r.num_queries * d + r.kv_dim * d + 3 * d * d + 3 * d + d * d + d + 6 * d + d * d
    return llm + vision + resampler

