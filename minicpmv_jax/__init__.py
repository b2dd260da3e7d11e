"""minicpmv-jax: MiniCPM-V 2.6 (SigLIP-400M + perceiver resampler + Qwen2-7B) in JAX / Flax NNX.

Public interface (DESIGN.md §8)::

    import minicpmv_jax as mcv
    model = mcv.MiniCPMV.from_pretrained(path, dtype="bfloat16")
    processor = mcv.MiniCPMVProcessor.from_pretrained(path)
    logits = model.compute_logits(processor(["Hello"]))
"""

from .config import (ConfigError, MiniCPMVConfig, Qwen2Config, ResamplerConfig, SliceConfig, VisionConfig,
                     minicpmv_2_6, tiny)
from .hf_checkpoint import CheckpointError
from .model import MiniCPMV
from .processor import MiniCPMVProcessor
from .tokenizer import MiniCPMVTokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "MiniCPMV", "MiniCPMVConfig", "MiniCPMVProcessor", "MiniCPMVTokenizer",
    "Qwen2Config", "ResamplerConfig", "SliceConfig", "VisionConfig", "minicpmv_2_6", "tiny",
]
