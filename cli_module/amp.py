"""AMP, Adaptive Multi-Projection: V̂_k = P(V_k) + (alpha / r) B_k A_k V_k for each selected vision layer k.

P is the base's pretrained (frozen) projector, shared by all layers; each layer gets its own low-rank pair
with B_k zero-initialised, so an untrained AMP equals P applied to every selected layer. Optional average
pooling over the square token grid (as LLaVA-OneVision does, 2x2; ``pool_tokens``) shortens the visual
sequence before AMP; the fused model applies it when it extracts features, so the feature cache stores it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def pool_tokens(tokens: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool a square token grid: (..., N, D) -> (..., N / pool^2, D)."""
    if pool == 1:
        return tokens
    *lead, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n or side % pool:
        raise ValueError(f"cannot pool {n} tokens by {pool}: need a square grid whose side divides by {pool}")
    grid = tokens.reshape(-1, side, side, d).permute(0, 3, 1, 2)  # (B', D, side, side)
    grid = F.avg_pool2d(grid, pool)  # (B', D, side/pool, side/pool)
    return grid.flatten(2).transpose(1, 2).reshape(*lead, -1, d)


class AMP(nn.Module):
    def __init__(self, num_layers: int, vision_dim: int, text_dim: int, rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank if rank else 0.0
        self.dropout = nn.Dropout(dropout)
        if rank:
            self.lora_A = nn.Parameter(torch.empty(num_layers, rank, vision_dim))  # (K, r, Dv)
            self.lora_B = nn.Parameter(torch.zeros(num_layers, text_dim, rank))  # (K, D, r), zero: no-op at init
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, layers: torch.Tensor, projector: nn.Module) -> torch.Tensor:
        """layers (B, K, N, Dv) vision hidden states (already pooled) -> (B, K, N, D) tokens in the LLM space."""
        weight = next(projector.parameters())
        layers = layers.to(weight.device)
        out = projector(layers.to(weight.dtype))  # (B, K, N, D)
        if self.rank:
            x = self.dropout(layers).to(self.lora_A.dtype)
            low = torch.einsum("bknv,krv->bknr", x, self.lora_A)  # (B, K, N, r)
            delta = torch.einsum("bknr,kdr->bknd", low, self.lora_B) * self.scale  # (B, K, N, D)
            out = out + delta.to(out.dtype)
        return out
