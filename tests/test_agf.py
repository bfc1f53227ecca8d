"""AGF's attention on 4-D tensors (B, H*K, S, dh): the same output as the 5-D (B, H, K, S, dh) formulation it
replaced, exactly under the same SDPA kernel, and within float rounding under the fused one it now reaches."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli_module.agf import AGF


def five_d(agf: AGF, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous AGF.forward (no mask), attention over (B, H, K, S, dh): the reference."""
    keys, values = kv
    b, s, _ = h.shape
    k, dh = keys.shape[2], keys.shape[-1]
    hn = agf.norm_q(h)
    q = agf.q_proj(hn).view(b, s, agf.heads, dh).transpose(1, 2).unsqueeze(2).expand(b, agf.heads, k, s, dh)
    ctx = F.scaled_dot_product_attention(q, keys, values).permute(0, 3, 2, 1, 4).reshape(b, s, k, agf.attn_dim)
    pair = torch.cat([hn.unsqueeze(2).expand(b, s, k, hn.shape[-1]), ctx], dim=-1)
    gates = torch.sigmoid(agf.gate_proj(pair) + agf.gate_bias)
    return h + agf.out_proj((gates * ctx).sum(dim=2)), gates.mean(dim=-1)


@pytest.mark.parametrize("gate", ["layer", "channel"])
def test_four_d_attention_equals_the_five_d_formulation(gate):
    torch.manual_seed(0)
    agf = AGF(dim=32, attn_dim=16, num_vision_layers=3, heads=4, gate=gate).eval()
    with torch.no_grad():
        agf.out_proj.weight.normal_()  # a trained W_o, so the attention reaches the output
        h, visual = torch.randn(2, 5, 32), torch.randn(2, 3, 7, 32)
        kv = agf.project_kv(visual)  # (B, H, K, N, dh)
        with sdpa_kernel(SDPBackend.MATH):  # the same kernel for both: the same numbers
            got, got_gates = agf(h, kv)
            want, want_gates = five_d(agf, h, kv)
        assert torch.equal(got, want) and torch.equal(got_gates, want_gates)
        fused, fused_gates = agf(h, kv)  # whatever SDPA picks for 4-D inputs (the fused CPU kernel here)
        assert torch.allclose(fused, want, atol=1e-5) and torch.allclose(fused_gates, want_gates, atol=1e-6)
        assert not torch.equal(got, h)  # the update is not zero: the comparison means something
