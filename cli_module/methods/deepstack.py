"""deepstack: a static multi-layer baseline (DeepStack-style). Vision layer k_i's AMP tokens, through a
zero-initialised D x D map W_i, are added at the image positions of decoder layer t_i during the prefill: no
attention, no gate. (A zero-init scalar scale cannot grow past ~lr per Adam step, so that variant barely trained.)"""

from __future__ import annotations

from torch import nn

from ..amp import AMP
from .base import Injection, Method


class DeepStack(Method):
    name = "deepstack"
    reads_layers = True
    hooks_layers = True
    base_deepstack = True

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if len(config.vision_layers) != len(config.inject_layers):
            raise ValueError(
                f"deepstack pairs vision layer k_i with decoder layer t_i: got {len(config.vision_layers)} "
                f"vision layers and {len(config.inject_layers)} inject layers; give lists of equal length")
        if config.pool != 1:
            raise ValueError(f"method {config.method!r} adds vision tokens at the image positions, so pool must be "
                             f"1, got {config.pool}")

    def attach(self, fused) -> None:
        c, dv, d = fused.config, fused.base.feature_dim, fused.base.text_config.hidden_size
        fused.amp = AMP(len(fused.vision_layers), dv, d, c.lora_rank, c.lora_alpha, c.dropout)
        fused.deepstack_out = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in c.inject_layers)
        for layer in fused.deepstack_out:
            nn.init.zeros_(layer.weight)  # the untrained baseline adds exactly zero

    def visual_tokens(self, fused, vf):
        return fused.amp(vf.layers, fused.base.projector), []  # (B, K, N, D)

    def inject(self, fused, i, hidden, state) -> Injection:
        img = state["image_mask"]  # (B, S): the image positions (none while decoding)
        if img is not None and img.any():
            tokens = state["visual"].tokens[:, i]  # (B, N, D)
            real = state["visual"].token_mask  # (B, N) for padded Qwen images
            add = fused.deepstack_out[i](tokens.flatten(0, 1) if real is None else tokens[real])  # (image tokens, D)
            hidden = hidden.masked_scatter(img.unsqueeze(-1), hidden[img] + add.to(hidden.dtype))
        return Injection(hidden)
