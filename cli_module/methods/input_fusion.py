"""input_fusion: input-level multi-layer fusion (Dense Connector; transformers' list-valued
``vision_feature_layer``): [V_select ; V_k1 ; ...] concatenated per token into a widened P whose new input blocks
start at zero, so the untrained baseline is the base. The adapter carries the widened P."""

from __future__ import annotations

import torch
from torch import nn

from .base import Method


class FusionProjector(nn.Module):
    """P's first linear widened to take [V_select ; V_k1 ; ...]; the new blocks start at 0."""

    def __init__(self, projector: nn.Module, num_extra: int):
        super().__init__()
        old = projector.linear_1
        self.linear_1 = nn.Linear(old.in_features * (1 + num_extra), old.out_features, bias=old.bias is not None)
        with torch.no_grad():
            self.linear_1.weight.zero_()
            self.linear_1.weight[:, : old.in_features] = old.weight
            if old.bias is not None:
                self.linear_1.bias.copy_(old.bias)
        self.act = projector.act
        self.linear_2 = nn.Linear(projector.linear_2.in_features, projector.linear_2.out_features,
                                  bias=projector.linear_2.bias is not None)
        self.linear_2.load_state_dict(projector.linear_2.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class InputFusion(Method):
    name = "input_fusion"
    reads_layers = True
    base_deepstack = True

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if config.pool != 1:
            raise ValueError(f"method {config.method!r} adds vision tokens at the image positions, so pool must be "
                             f"1, got {config.pool}")

    def attach(self, fused) -> None:
        if fused.base.qwen:
            raise ValueError("input_fusion widens LLaVA's MLP projector; a Qwen base's P is its ViT's patch merger: "
                             "compare with method cli, deepstack or (Qwen3-VL) shipped instead")
        self.fusion_layers = [k for k in fused.vision_layers if k != fused.select_layer]
        fused.fusion_projector = FusionProjector(fused.base.projector, len(self.fusion_layers))

    def image_embeds(self, fused, vf):
        extra = [vf.layers[:, fused.vision_layers.index(k)] for k in self.fusion_layers]  # each (B, N, Dv)
        return fused.fusion_projector(torch.cat([vf.select_features, *extra], dim=-1).to(*fused.projector_place()))
