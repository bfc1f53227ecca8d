"""projector_ft: the base with its projector P fine-tuned on the same data and steps (LLaVA's stage 1 recipe);
the adapter carries P's weights. Nothing is injected."""

from __future__ import annotations

from .base import Method


class ProjectorFT(Method):
    name = "projector_ft"
    projector_modified = True
    base_deepstack = True

    def mark_trainable(self, fused) -> None:
        fused.base.projector.requires_grad_(True)
