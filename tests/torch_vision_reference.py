"""A plain PyTorch reference of the SigLIP encoder and the resampler, written from docs/model.md §2–§4.

It is deliberately independent of the JAX code: a real ``nn.Conv2d`` patch embedding, the position table
as an ``nn.Embedding`` indexed with ``torch.bucketize`` exactly as docs/model.md §3 states, ``nn.LayerNorm``,
eager attention with the softmax in float32, and ``nn.MultiheadAttention`` for the resampler. Module
attribute names follow the checkpoint, so ``state_dict()`` keys are exactly the docs/model.md §2 names without
the ``vpm.`` / ``resampler.`` prefix. One piece at a time, no padding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def torch_bucket_coords(n: int, side: int = 70) -> torch.Tensor:
    """docs/model.md §3 verbatim: bucketize float32 fractional coordinates of an ``n``-patch side."""
    fractional = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(n))
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    return torch.bucketize(fractional, boundaries, right=True)


class SiglipAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, D]
        length = x.shape[0]
        split = lambda t: t.view(length, self.num_heads, self.head_dim).transpose(0, 1)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.matmul(q, k.transpose(1, 2)) * self.head_dim ** -0.5
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(0, 1).reshape(length, -1)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, num_heads: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SiglipAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SiglipMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, dim: int, patch_size: int, side: int):
        super().__init__()
        self.side = side
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding(side * side, dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [3, h, w] -> [H·W, D]
        x = self.patch_embedding(image[None])[0]              # [D, H, W]
        height, width = x.shape[1:]
        x = x.flatten(1).T                                    # row-major patches
        ids = (torch_bucket_coords(height, self.side)[:, None] * self.side
               + torch_bucket_coords(width, self.side)[None, :]).flatten()
        return x + self.position_embedding(ids)


class SiglipEncoderModule(nn.Module):
    """Holds ``layers`` so that names read ``encoder.layers.{j}.…``."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class TorchSiglip(nn.Module):
    """``vpm``: embeddings, ``num_layers`` pre-norm layers, ``post_layernorm``."""

    def __init__(self, dim: int, hidden: int, num_heads: int, num_layers: int, *, patch_size: int = 14,
                 side: int = 70, eps: float = 1e-6):
        super().__init__()
        self.embeddings = SiglipEmbeddings(dim, patch_size, side)
        self.encoder = SiglipEncoderModule([SiglipLayer(dim, hidden, num_heads, eps) for _ in range(num_layers)])
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(image)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def sincos_2d_table(height: int, width: int, dim: int) -> torch.Tensor:
    """docs/model.md §4: float32 [H·W, dim]; first half encodes the column, last half the row."""
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32) / quarter
    omega = 1.0 / 10000 ** omega

    def half(p: torch.Tensor) -> torch.Tensor:
        angle = p.to(torch.float32)[:, None] * omega[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.cat([half(cols), half(rows)], dim=1)


class TorchResampler(nn.Module):
    def __init__(self, num_queries: int, dim: int, kv_dim: int, *, head_dim: int = 128, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, dim // head_dim)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:  # [H·W, E] -> [Q, D]
        kv = self.ln_kv(self.kv_proj(x))
        pos = sincos_2d_table(height, width, self.dim).to(kv.dtype)
        q = self.ln_q(self.query)
        # nn.MultiheadAttention without batch_first takes [L, N, E]; one piece -> N = 1.
        out = self.attn(q[:, None], (kv + pos)[:, None], kv[:, None], need_weights=False)[0][:, 0]
        return self.ln_post(out) @ self.proj


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights with a realistic spread (in place).

    Linear / conv / projection weights N(0, 1/fan_in); LayerNorm weights 1 + N(0, 0.1); biases N(0, 0.1);
    position table and queries N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.LayerNorm)}
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name in norm_weights:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif name in ("embeddings.position_embedding.weight", "query"):
            p.copy_(noise)
        elif name == "proj":
            p.copy_(noise / math.sqrt(p.shape[0]))
        else:  # [out, in, ...] weights, including in_proj_weight [3D, D]
            p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def numpy_state_dict(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().to(torch.float32).numpy() for k, v in module.state_dict().items()}
