"""The base VLM as the CLI plug-in sees it: a frozen vision encoder, projector P, decoder layers and LM head.

``Base`` names those parts whatever the source (LLaVA-1.5, LLaVA-OneVision, or a composed base); how a base is
built or loaded lives in ``cli_module.loading`` (presets in ``presets``, composed folders in ``composed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Kind = Literal["llava", "llava_onevision", "composed", "qwen2_5_vl", "qwen3_vl"]


@dataclass
class Base:
    name: str  # preset name, hub id, local folder or s3:// prefix it came from
    kind: Kind  # which family of model ``model`` is
    model: nn.Module  # the whole frozen base
    tokenizer: Any  # its tokenizer, with a chat template
    image_processor: Any  # its image processor (None on the meta-device shape preset)
    image_token_id: int  # placeholder token replaced by projected image features
    select_layer: int  # vision hidden_states index the base feeds to the LLM input (LLaVA: -2)
    select_strategy: str  # "default" drops the CLS token, "full" keeps every token
    revision: str | None = None  # hub revision or content hash, recorded in caches and adapters
    encoder_source: tuple[str, str | None] | None = None  # (name, revision) of the base whose encoder this one
    # shares unchanged (a derived base, cli_module.derived): feature caches are keyed by it

    @property
    def encoder_identity(self) -> tuple[str, str | None]:
        """(name, revision) that the encoder's features depend on: the feature cache's key."""
        return self.encoder_source or (self.name, self.revision)

    @property
    def qwen(self) -> bool:
        """A Qwen2.5-VL / Qwen3-VL base (``cli_module.qwen``): dynamic resolution, merge-unit tokens, M-RoPE."""
        return self.kind in ("qwen2_5_vl", "qwen3_vl")

    @property
    def vision_tower(self) -> nn.Module:
        if self.qwen:
            return self.model.model.visual
        return self.model.vision_tower if self.kind == "composed" else self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        if self.qwen:  # the ViT's patch merger, over merge-unit tokens (a view of the model's own module)
            from .qwen import MergerProjector

            return MergerProjector(self.model.model.visual.merger, self.vision_config.hidden_size)
        return self.model.multi_modal_projector if self.kind == "composed" else self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The decoder backbone (embed_tokens, layers, norm), without the LM head."""
        return self.model.lm.get_decoder() if self.kind == "composed" else self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm.get_output_embeddings() if self.kind == "composed" else self.model.lm_head

    @property
    def vision_config(self) -> Any:
        return self.vision_tower.config

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def feature_dim(self) -> int:
        """Width of one vision token the plug-in reads (AMP's input): the encoder's hidden size, or for a Qwen base
        a 2x2 merge unit of patches (4 x hidden size)."""
        if self.qwen:
            from .qwen import feature_dim

            return feature_dim(self)
        return self.vision_config.hidden_size

    @property
    def num_vision_layers(self) -> int:
        return self.vision_config.num_hidden_layers

    @property
    def num_text_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def grid(self) -> int | None:
        """Side of the square visual token grid of one crop, from the processor's crop size and the patch size;
        None for a Qwen base, whose token count varies per image (``image_grid_thw``, ``cli_module.qwen``)."""
        if self.qwen:
            return None
        size = self.vision_config.image_size
        for attr in ("crop_size", "size"):  # what the processor feeds the encoder, if it says
            value = getattr(self.image_processor, attr, None)
            height = value.get("height") if isinstance(value, dict) else getattr(value, "height", None)
            if getattr(self.image_processor, "do_center_crop", attr == "size") is False and attr == "crop_size":
                continue
            if height:
                size = height
                break
        return size // self.vision_config.patch_size  # the patch convolution rounds down: 384 px / 14 -> 27

    def image_tokens(self, crop_tokens: int) -> int:
        """Input positions an image takes when it enters as its one whole-image crop of ``crop_tokens`` features
        (the feature cache's and every job's visual input): OneVision appends its ``image_newline`` token. A Qwen
        image takes exactly its merged token count, t * h * w / merge^2 of its ``image_grid_thw``."""
        return crop_tokens + 1 if self.kind == "llava_onevision" else crop_tokens

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the select strategy to one layer's hidden states (B, 1+N, Dv) -> (B, N, Dv)."""
        return hidden[:, 1:] if self.select_strategy == "default" else hidden



def grid_side(num_tokens: int) -> int | None:
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None
