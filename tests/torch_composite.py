"""The whole MiniCPM-V forward in PyTorch, for parity tests: transformers' Qwen2 + the torch vision reference.

Built from a checkpoint's tensors (the names of docs/model.md §2) and driven by the processor's batch dict:
per prompt, each piece goes through ``TorchSiglip`` and ``TorchResampler`` one at a time (no padding),
its 64 features replace the embeddings of its ``image_bound`` span, and Qwen2 runs on ``inputs_embeds``
with docs/model.md §5's position ids for left padding. Deliberately written without any of the JAX code.
"""

from __future__ import annotations

import numpy as np
import torch

from minicpmv_jax.config import MiniCPMVConfig
from reference import hf_qwen2
from torch_vision_reference import TorchResampler, TorchSiglip


class TorchMiniCPMV:
    """vpm + resampler + llm holding ``tensors`` (strict loads), float32 by default."""

    def __init__(self, cfg: MiniCPMVConfig, tensors: dict[str, np.ndarray], dtype=torch.float32):
        v, r = cfg.vision, cfg.resampler
        self.cfg = cfg
        self.llm = hf_qwen2(cfg, tensors, dtype)
        self.vpm = TorchSiglip(v.hidden_size, v.intermediate_size, v.num_attention_heads, cfg.num_vision_layers,
                               patch_size=v.patch_size, side=v.num_patches_per_side, eps=v.layer_norm_eps)
        self.resampler = TorchResampler(r.num_queries, r.embed_dim, r.kv_dim, head_dim=r.head_dim,
                                        eps=r.layer_norm_eps)
        for name, module in (("vpm", self.vpm), ("resampler", self.resampler)):
            state = {k[len(name) + 1:]: torch.from_numpy(np.asarray(t, np.float32)) for k, t in tensors.items()
                     if k.startswith(name + ".")}
            if name == "vpm":  # the checkpoint may hold layers beyond those that run
                state = {k: t for k, t in state.items()
                         if not k.startswith("encoder.layers.")
                         or int(k.split(".")[2]) < cfg.num_vision_layers}
            module.load_state_dict(state, strict=True)
            module.to(dtype).eval()
        self.dtype = dtype

    @torch.no_grad()
    def features(self, piece: np.ndarray) -> torch.Tensor:
        """One piece float32 [3, h, w] → [Q, D]."""
        p = self.cfg.vision.patch_size
        x = self.vpm(torch.from_numpy(np.asarray(piece)).to(self.dtype))
        return self.resampler(x, piece.shape[1] // p, piece.shape[2] // p)

    @torch.no_grad()
    def embeddings(self, batch: dict) -> torch.Tensor:
        """Token embeddings [B, L, D] with every piece's features written into its span."""
        ids = torch.from_numpy(np.asarray(batch["input_ids"])).long()
        x = self.llm.model.embed_tokens(ids).clone()
        for b, (bounds, pieces) in enumerate(zip(batch["image_bound"], batch["pixel_values"])):
            for (start, end), piece in zip(np.asarray(bounds).tolist(), pieces):
                x[b, start:end] = self.features(piece).to(x.dtype)
        return x

    @torch.no_grad()
    def logits(self, batch: dict) -> np.ndarray:
        """float32 logits [B, L, V] of the processor's ``batch``."""
        mask = np.asarray(batch["attention_mask"]).astype(np.int64)
        positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 1)
        out = self.llm(inputs_embeds=self.embeddings(batch), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(positions))
        return out.logits.float().numpy()
