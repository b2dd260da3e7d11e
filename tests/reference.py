"""PyTorch references shared by the tests (transformers' Qwen2 for the language model)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from minicpmv_jax.config import MiniCPMVConfig


def hf_qwen2(cfg: MiniCPMVConfig, tensors: dict[str, np.ndarray], dtype=torch.float32):
    """transformers' Qwen2ForCausalLM holding the ``llm.*`` tensors of a checkpoint (strict load)."""
    c = cfg.llm
    hc = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(hc).eval()
    state = {k[len("llm."):]: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()
             if k.startswith("llm.")}
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float32 logits of the reference with docs/model.md §5's position ids for left padding."""
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 1)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(positions).long())
    return out.logits.float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|: the project's relative error for logits and activations."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny_hf_qwen2(vocab_size: int, hidden_size: int, num_layers: int = 2, seed: int = 7):
    """A small random transformers Qwen2 (realistic spread, tiny() shapes) for decoding-maths tests."""
    from minicpmv_jax.config import tiny
    from minicpmv_jax.testing.checkpoint import checkpoint_shapes, random_tensor

    cfg = tiny(vocab_size=vocab_size, num_layers=num_layers, hidden_size=hidden_size)
    rng = np.random.default_rng(seed)
    tensors = {n: random_tensor(n, s, rng) for n, s in checkpoint_shapes(cfg).items() if n.startswith("llm.")}
    return hf_qwen2(cfg, tensors)
