"""cli: Cross-Layer Injection. AMP maps every vision layer K into the LLM space (P plus a low-rank adapter per
layer); at each decoder layer in T, AGF lets the hidden states query all of them and gates each layer's share.

  V̂ = AMP(V_K)                       (B, K, N', D)  once per image
  (keys, values)_t = AGF_t.project_kv(V̂)           once per image and injection layer
  h_t <- h_t + W_o Σ_k g_k c_k        at every position (``positions``) and every decoding step
"""

from __future__ import annotations

from torch import nn

from ..agf import AGF
from ..amp import AMP
from .base import Injection, Method


class CLI(Method):
    name = "cli"
    reads_layers = True
    hooks_layers = True
    base_deepstack = True

    @property
    def reads_visual_when_decoding(self) -> bool:  # AGF at the image positions only is done after the prefill
        return self.positions != "image"

    def attach(self, fused) -> None:
        c, dv, d = fused.config, fused.base.feature_dim, fused.base.text_config.hidden_size
        self.positions = c.positions
        fused.amp = AMP(len(fused.vision_layers), dv, d, c.lora_rank, c.lora_alpha, c.dropout)
        fused.agf = nn.ModuleList(AGF(d, c.attn_dim, len(fused.vision_layers), c.heads, c.gate, c.dropout,
                                      c.gate_init) for _ in c.inject_layers)

    def visual_tokens(self, fused, vf):
        tokens = fused.amp(vf.layers, fused.base.projector)  # (B, K, N', D)
        return tokens, [agf.project_kv(tokens) for agf in fused.agf]

    def inject(self, fused, i, hidden, state) -> Injection:
        visual, mask = state["visual"], state["update_mask"]
        rows = visual.rows  # (B,) bool, or None: every row holds an image
        keys = visual.token_mask  # (B', N') real visual tokens (padded Qwen images), or None
        if rows is None:
            hidden, gates = fused.agf[i](hidden, visual.kv[i], mask, keys)
            return Injection(hidden, gates)
        # mixed batch: only the rows with an image read it; text-only rows pass unchanged (gates 0)
        sub, sub_gates = fused.agf[i](hidden[rows], visual.kv[i], None if mask is None else mask[rows], keys)
        hidden = hidden.clone()
        hidden[rows] = sub
        gates = sub_gates.new_zeros((hidden.shape[0], *sub_gates.shape[1:]))  # (B, S, K)
        gates[rows] = sub_gates
        return Injection(hidden, gates)
