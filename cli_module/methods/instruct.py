"""instruct: LLaVA's visual instruction tuning, P and the whole LLM trained (the encoder never). The result is a
derived base (``cli_module.derived``), the trained base CLI and the baselines then sit on, not an adapter."""

from __future__ import annotations

from .base import Method


class Instruct(Method):
    name = "instruct"
    trains_base = True
    base_deepstack = True

    def mark_trainable(self, fused) -> None:
        fused.base.projector.requires_grad_(True)
        fused.base.language_model.requires_grad_(True)
        fused.base.lm_head.requires_grad_(True)
