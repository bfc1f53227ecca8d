"""The interface every method of the fused model implements, with the behaviour of the base as it is.

A method is a small object the fused model holds (``FusedVLM.method``): it attaches its trainable modules to the
fused model under their own names (so an adapter's tensor names do not depend on this class), says which base
parts train, maps the encoder's features to the input path and to its own tokens once per image, and, when it
hooks decoder layers, updates their hidden states. ``one_to_one`` is exactly this class: the frozen base, nothing
injected. Each other method is one file in this package, registered in ``__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import CLIConfig
    from ..model import FusedVLM, VisionFeatures


@dataclass
class Injection:
    """One decoder layer's update, for the forward hook: the new hidden states and the gates (or None)."""

    hidden: torch.Tensor  # (B, S, D)
    gates: torch.Tensor | None = None  # (B, S, K) AGF gates of this layer


class Method:
    """The base as it is (``one_to_one``): no trainable parameter, nothing injected."""

    name: ClassVar[str] = "one_to_one"
    reads_layers: ClassVar[bool] = False  # reads the vision layers K (the feature cache must hold them)
    hooks_layers: ClassVar[bool] = False  # updates the hidden states of the decoder layers T
    reads_visual_when_decoding: ClassVar[bool] = False  # its hook needs per-image tensors at every decoding step
    projector_modified: ClassVar[bool] = False  # the adapter carries P's weights
    trains_base: ClassVar[bool] = False  # P and the LLM train: the result is a derived base, not an adapter
    modifies_base: ClassVar[bool] = False  # inserts modules into the base it is built on (never share that base)
    base_deepstack: ClassVar[bool] = False  # a Qwen3-VL base keeps its own DeepStack (as shipped); one_to_one turns
    #                                         it off (the one-to-one input path only); no effect on other bases

    @classmethod
    def check(cls, config: CLIConfig) -> None:
        """Checks of a config on its own for this method (ValueError with the numbers); a method with more to
        check extends it."""
        if cls.reads_layers and not config.vision_layers:
            raise ValueError(f"vision_layers is empty; method {config.method!r} needs at least one vision layer")
        if cls.hooks_layers and not config.inject_layers:
            raise ValueError(f"inject_layers is empty; method {config.method!r} needs at least one decoder layer")

    def attach(self, fused: FusedVLM) -> None:
        """Build this method's modules on ``fused`` (under the names its adapter files use)."""

    def mark_trainable(self, fused: FusedVLM) -> None:
        """After the base is frozen and the attached modules made trainable: which base parts train too."""

    def base_parameters(self, fused: FusedVLM) -> dict[str, torch.nn.Parameter]:
        """The parameters this method inserted inside the base (``modifies_base``), by their adapter names."""
        return {}

    def image_embeds(self, fused: FusedVLM, vf: VisionFeatures) -> torch.Tensor:
        """The input path: the select layer's features through P -> (C, N, D)."""
        return fused.base.projector(vf.select_features.to(*fused.projector_place()))

    def visual_tokens(self, fused: FusedVLM, vf: VisionFeatures) -> tuple[torch.Tensor | None, list]:
        """Once per image: this method's tokens (B, K, N', D) and per-hooked-layer tensors (e.g. AGF's keys and
        values), or (None, [])."""
        return None, []

    def inject(self, fused: FusedVLM, i: int, hidden: torch.Tensor, state: dict) -> Injection:
        """Hooked decoder layer ``i`` (index into config.inject_layers): hidden (B, S, D) -> the update."""
        return Injection(hidden)
