"""Composed bases: any transformers vision encoder + LLaVA's MLP projector + any causal LM, as one module and
one folder (``vision/``, ``lm/``, ``projector.safetensors`` and ``crosslayer_base.json``); and ``VisionStub``,
which stands in for an encoder that is not loaded (training from the feature cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .bases import Base

COMPOSED_FILE = "crosslayer_base.json"


class MLPProjector(nn.Module):
    """LLaVA's projector P: Linear -> GELU -> Linear, vision width to LLM width; with ``input_norm``, each token is
    first normalised (LayerNorm without weights, so no parameters are added). A fresh projector over an encoder
    whose hidden states are not normalised needs it: DINOv2-S's last-layer states have norm ~39 and its layer 3's
    ~1, so an un-normalised P maps them to tokens ~45x the LLM's embedding norm (which Adam can only turn slowly)
    and the early layers to near-constant tokens (bench/RESULTS.md, "Quality")."""

    def __init__(self, vision_dim: int, text_dim: int, input_norm: bool = False):
        super().__init__()
        self.input_norm = input_norm
        self.norm = nn.LayerNorm(vision_dim, elementwise_affine=False) if input_norm else nn.Identity()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(x))))  # (..., vision_dim) -> (..., text_dim)


class VisionStub(nn.Module):
    """Stands in for an encoder that is not loaded (training from cached features): its config, no weights."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the vision encoder is not loaded here (load_base(..., vision=False)): "
                           "features come from the feature cache")


class ComposedVLM(nn.Module):
    """Any transformers vision model with hidden states + an MLP projector + any causal LM."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, lm: nn.Module):
        super().__init__()
        self.vision_tower, self.multi_modal_projector, self.lm = vision_tower, projector, lm



def save_composed(model: ComposedVLM, tokenizer: Any, image_processor: Any, out: Path, *,
                  image_token: str, select_layer: int, select_strategy: str) -> None:
    """Write a ComposedVLM folder: vision/ and lm/ (save_pretrained, safetensors), projector.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    model.vision_tower.save_pretrained(out / "vision", safe_serialization=True)
    image_processor.save_pretrained(out / "vision")
    model.lm.save_pretrained(out / "lm", safe_serialization=True)
    tokenizer.save_pretrained(out / "lm")
    proj = model.multi_modal_projector
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(out / "projector.safetensors"))
    meta = dict(image_token=image_token, select_layer=select_layer, select_strategy=select_strategy,
                vision_dim=proj.linear_1.in_features, text_dim=proj.linear_2.out_features,
                projector_input_norm=bool(getattr(proj, "input_norm", False)))
    (out / COMPOSED_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_composed(path: Path, name: str, vision: bool = True, weights: bool = True, language: bool = True) -> Base:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = json.loads(Path(path, COMPOSED_FILE).read_text())
    if not vision:
        tower = VisionStub(AutoConfig.from_pretrained(path / "vision"))
    elif weights:
        tower = AutoModel.from_pretrained(path / "vision", use_safetensors=True)
    else:
        with torch.device("meta"):
            tower = AutoModel.from_config(AutoConfig.from_pretrained(path / "vision"))
    if weights and language:
        lm = AutoModelForCausalLM.from_pretrained(path / "lm", use_safetensors=True)
        projector = MLPProjector(meta["vision_dim"], meta["text_dim"], meta.get("projector_input_norm", False))
        projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    else:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path / "lm"))
            projector = MLPProjector(meta["vision_dim"], meta["text_dim"], meta.get("projector_input_norm", False))
    tok = AutoTokenizer.from_pretrained(path / "lm")
    proc = AutoImageProcessor.from_pretrained(path / "vision")
    image_token_id = tok.convert_tokens_to_ids(meta["image_token"])
    return Base(name=name, kind="composed", model=ComposedVLM(tower, projector, lm), tokenizer=tok,
                image_processor=proc, image_token_id=image_token_id, select_layer=meta["select_layer"],
                select_strategy=meta["select_strategy"], revision=meta.get("revision"))
