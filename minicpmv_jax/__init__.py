"""minicpmv-jax: MiniCPM-V 2.6 (SigLIP-400M + perceiver resampler + Qwen2-7B) in JAX / Flax NNX.

Public interface (docs/model.md §8)::

    import minicpmv_jax as mcv
    model = mcv.MiniCPMV.from_pretrained(path, dtype="bfloat16")
    processor = mcv.MiniCPMVProcessor.from_pretrained(path)
    answer = model.chat(msgs=[{"role": "user", "content": [image, "What is this?"]}], processor=processor)
    logits = model.compute_logits(processor(["Hello"]))
"""

from .config import (ConfigError, MiniCPMVConfig, Qwen2Config, ResamplerConfig, SliceConfig, VisionConfig,
                     minicpmv_2_6, tiny)
from .generation_config import GenerationConfig
from .hf_checkpoint import CheckpointError
from .image_processing import ImageError, load_image
from .model import MiniCPMV
from .processor import MiniCPMVProcessor
from .tokenizer import MiniCPMVTokenizer
from .version import __version__
from .video import VideoError, load_video


__all__ = [
    "CheckpointError", "ConfigError", "GenerationConfig", "ImageError", "MiniCPMV", "MiniCPMVConfig",
    "MiniCPMVProcessor", "MiniCPMVTokenizer", "Qwen2Config", "ResamplerConfig", "SliceConfig", "VideoError",
    "VisionConfig", "load_image", "load_video", "minicpmv_2_6", "tiny",
]
