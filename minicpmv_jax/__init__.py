"""minicpmv-jax: MiniCPM-V 2.6 (SigLIP-400M + perceiver resampler + Qwen2-7B) in JAX / Flax NNX.

Public interface (docs/model.md §8)::

    import minicpmv_jax as mcv
    model = mcv.MiniCPMV.from_pretrained(path, dtype="bfloat16")
    processor = mcv.MiniCPMVProcessor.from_pretrained(path)
    answer = model.chat(msgs=[{"role": "user", "content": [image, "What is this?"]}], processor=processor)
    logits = model.compute_logits(processor(["Hello"]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy_exports import lazy_exports
from .version import __version__

# Public name → the module that defines it. Nothing is imported until first use, so that importing a
# host-side module (``minicpmv_jax.processor``, ``minicpmv_jax.slicing``, …) loads neither JAX nor the model.
_EXPORTS = {
    "ConfigError": "config", "MiniCPMVConfig": "config", "Qwen2Config": "config", "ResamplerConfig": "config",
    "SliceConfig": "config", "VisionConfig": "config", "minicpmv_2_6": "config", "tiny": "config",
    "GenerationConfig": "generation_config",
    "CheckpointError": "hf_checkpoint",
    "ImageError": "image_processing", "load_image": "image_processing",
    "MiniCPMV": "chat",
    "MiniCPMVModel": "model",
    "MiniCPMVProcessor": "processor",
    "MiniCPMVTokenizer": "tokenizer",
    "VideoError": "video", "load_video": "video",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .chat import MiniCPMV
    from .config import (ConfigError, MiniCPMVConfig, Qwen2Config, ResamplerConfig, SliceConfig, VisionConfig,
                         minicpmv_2_6, tiny)
    from .generation_config import GenerationConfig
    from .hf_checkpoint import CheckpointError
    from .image_processing import ImageError, load_image
    from .model import MiniCPMVModel
    from .processor import MiniCPMVProcessor
    from .tokenizer import MiniCPMVTokenizer
    from .video import VideoError, load_video


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
