"""AGF, Adaptive Gating Fusion: one decoder layer's hidden states query every vision layer, gated.

For hidden states h (B, S, D) and the AMP tokens V̂ (B, K, N, D) of K vision layers, with attention width A:
  c_k = MultiHeadAttention(q = W_q norm(h), k = W_k norm(V̂_k), v = W_v norm(V̂_k))   per layer, (B, S, K, A)
  g_k = sigmoid(W_g [norm(h) ; c_k] + b_k)                       (B, S, K, 1) per layer or (B, S, K, A) per channel
  h  <- h + W_o (sum_k g_k * c_k)                                 W_o (A -> D) zero-initialised
Keys and values over V̂ depend only on the image, so ``project_kv`` runs once per image (prefill) and the
result is reused at every decoding step; a step then costs one query, one attention over K*N tokens, one gate.
The attention runs on (B, H*K, S, dh) tensors (vision layers folded into the heads), one fused SDPA call.
Ablation: ``zeroed`` (positions in K, set by ``FusedVLM.zero_gates``) forces g_k = 0 for those layers, so they
add nothing; with every layer zeroed the update is exactly 0 and the layer's output is the base's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import Gate


class AGF(nn.Module):
    def __init__(self, dim: int, attn_dim: int, num_vision_layers: int, heads: int, gate: Gate,
                 dropout: float = 0.0, gate_init: float = 0.0):
        super().__init__()
        self.heads, self.attn_dim, self.gate_kind = heads, attn_dim, gate
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, attn_dim, bias=False)
        self.k_proj = nn.Linear(dim, attn_dim, bias=False)
        self.v_proj = nn.Linear(dim, attn_dim, bias=False)
        width = {"layer": 1, "channel": attn_dim, "none": 0}[gate]
        if width:
            self.gate_proj = nn.Linear(dim + attn_dim, width)  # controller over [h ; c_k], shared by layers
            self.gate_bias = nn.Parameter(torch.full((num_vision_layers, width), float(gate_init)))  # b_k
        self.out_proj = nn.Linear(attn_dim, dim, bias=False)
        nn.init.zeros_(self.out_proj.weight)  # untrained AGF adds exactly zero
        self.dropout = nn.Dropout(dropout)
        self.zeroed: tuple[int, ...] = ()  # ablation: positions k in K whose gates are forced to 0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, N, A) -> (B, H, K, N, A/H)."""
        b, k, n, _ = x.shape
        return x.view(b, k, n, self.heads, -1).permute(0, 3, 1, 2, 4)

    def project_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual (B, K, N, D) -> keys, values (B, H, K, N, A/H); once per image and injection layer."""
        x = self.norm_kv(visual.to(self.q_proj.weight.dtype))
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def forward(self, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, S, D), kv from ``project_kv``, mask (B, S) of positions to update, key_mask (B, N) of the real
        visual tokens when images of different token counts share a batch (a Qwen base) -> (h', gates (B, S, K))."""
        keys, values = kv  # (B, H, K, N, dh)
        b, s, _ = h.shape
        k, dh = keys.shape[2], keys.shape[-1]
        hn = self.norm_q(h.to(self.q_proj.weight.dtype))  # (B, S, D)
        q = self.q_proj(hn).view(b, s, self.heads, dh).transpose(1, 2)  # (B, H, S, dh)
        q = q.unsqueeze(2).expand(b, self.heads, k, s, dh).reshape(b, self.heads * k, s, dh)  # (B, H*K, S, dh)
        n = keys.shape[3]
        # the vision layers folded into the heads: 4-D tensors, so SDPA stays one fused call (5-D ones fall back
        # to the math path); each (head, layer) pair is its own attention: softmax within each layer
        attn_mask = None if key_mask is None else key_mask[:, None, None, :].to(q.device)  # (B, 1, 1, N)
        ctx = F.scaled_dot_product_attention(q, keys.reshape(b, self.heads * k, n, dh),
                                             values.reshape(b, self.heads * k, n, dh),
                                             attn_mask=attn_mask)  # (B, H*K, S, dh)
        ctx = ctx.view(b, self.heads, k, s, dh).permute(0, 3, 2, 1, 4).reshape(b, s, k, self.attn_dim)  # (B, S, K, A)
        if self.gate_kind == "none":
            gates = ctx.new_ones(b, s, k, 1)
        else:
            pair = torch.cat([hn.unsqueeze(2).expand(b, s, k, hn.shape[-1]), ctx], dim=-1)  # (B, S, K, D+A)
            gates = torch.sigmoid(self.gate_proj(pair) + self.gate_bias)  # (B, S, K, 1 | A)
        if self.zeroed:
            keep = torch.ones(k, 1, dtype=gates.dtype, device=gates.device)  # (K, 1)
            keep[list(self.zeroed)] = 0.0
            gates = gates * keep  # (B, S, K, 1 | A): the zeroed layers add exactly nothing
        fused = (gates * ctx).sum(dim=2)  # (B, S, A)
        update = self.out_proj(self.dropout(fused))  # (B, S, D)
        if mask is not None:
            update = update * mask.unsqueeze(-1).to(update.dtype)
        return h + update.to(h.dtype), gates.mean(dim=-1)  # gates (B, S, K)
