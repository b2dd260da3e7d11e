"""A PyTorch training reference: the masked next-token loss of the torch composite and its autograd
gradients, for full fine-tuning and for hand-written LoRA.

Built on :class:`torch_composite.TorchMiniCPMV` (transformers' Qwen2 + the torch vision reference) with
the same tensors as the JAX model; the forward is re-written here with gradients enabled (the composite's
own methods run under ``no_grad``): each piece through SigLIP and the resampler one at a time (no
padding), its features written into its ``image_bound`` span, Qwen2 on ``inputs_embeds`` with docs/model.md §5's
position ids. Deliberately free of the JAX code.

LoRA is written by hand on the language model's ``q/k/v/o_proj``: ``base(x) + scale · (x @ A) @ B`` with
A ``[in, r]`` and B ``[r, out]`` (the torch layout of the flattened heads).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from torch_composite import TorchMiniCPMV

LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class TorchLoRALinear(nn.Module):
    """``base(x) + scale · (x @ A) @ B`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.from_numpy(np.array(a, np.float32)))
        self.lora_b = nn.Parameter(torch.from_numpy(np.array(b, np.float32)))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_a) @ self.lora_b)


class TorchTrainReference:
    """Loss and gradients of the composite on a fine-tuning batch (float32).

    ``lora``: None (every parameter trainable) or ``{(layer, projection): (A [in, r], B [r, out])}`` with a
    ``scale``; then only the adapters are trainable.
    """

    def __init__(self, cfg, tensors: dict[str, np.ndarray], lora: dict | None = None, scale: float = 1.0):
        self.net = TorchMiniCPMV(cfg, tensors)
        self.cfg = cfg
        self.modules = {"llm": self.net.llm, "vpm": self.net.vpm, "resampler": self.net.resampler}
        if lora is None:
            for m in self.modules.values():
                m.requires_grad_(True)
        else:
            for m in self.modules.values():
                m.requires_grad_(False)
            for (layer, proj), (a, b) in lora.items():
                attn = self.net.llm.model.layers[layer].self_attn
                setattr(attn, proj, TorchLoRALinear(getattr(attn, proj), a, b, scale))

    def _features(self, piece: np.ndarray) -> torch.Tensor:
        p = self.cfg.vision.patch_size
        x = self.net.vpm(torch.from_numpy(np.asarray(piece, np.float32)))
        return self.net.resampler(x, piece.shape[1] // p, piece.shape[2] // p)

    def loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's target tokens, their count), differentiable."""
        ids = torch.from_numpy(np.asarray(batch["input_ids"])).long()
        mask = np.asarray(batch["attention_mask"]).astype(np.int64)
        x = self.net.llm.model.embed_tokens(ids).clone()
        for b, (bounds, pieces) in enumerate(zip(batch.get("image_bound", []), batch.get("pixel_values", []))):
            for (start, end), piece in zip(np.asarray(bounds).reshape(-1, 2).tolist(), pieces):
                x[b, start:end] = self._features(piece)
        positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 1)
        logits = self.net.llm(inputs_embeds=x, attention_mask=torch.from_numpy(mask),
                              position_ids=torch.from_numpy(positions)).logits.float()
        targets = torch.from_numpy(np.asarray(batch["loss_mask"]))[:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="none").reshape(targets.shape)
        count = int(targets.sum())
        return (losses * targets).sum() / max(count, 1), count

    def loss_and_grads(self, batch: dict) -> tuple[float, int, dict[str, np.ndarray]]:
        """(loss, target tokens, gradient per trainable parameter). Full fine-tuning names gradients by
        checkpoint tensor name (docs/model.md §2); LoRA by ``layers.{i}.{proj}.lora_a`` / ``.lora_b``."""
        for m in self.modules.values():
            m.zero_grad(set_to_none=True)
        loss, count = self.loss(batch)
        loss.backward()
        grads = {}
        for tower, module in self.modules.items():
            for name, p in module.named_parameters():
                if p.grad is None and not p.requires_grad:
                    continue
                grad = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy()
                if ".lora_" in name:   # llm: model.layers.{i}.self_attn.{proj}.lora_{a,b}
                    parts = name.split(".")
                    grads[f"layers.{parts[2]}.{parts[4]}.{parts[-1]}"] = grad
                else:
                    grads[f"{tower}.{name}"] = grad
        return float(loss.detach()), count, grads
