"""Loading a base by name: a preset (``tiny``, ``tiny-onevision``, ``small``, ``llava-1.5-7b-shape``, the Qwen
``*-shape`` presets), a Hugging Face hub id, a local folder or an ``s3://`` prefix (mirrored into the local cache
first) holding a ``LlavaForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration`` checkpoint (safetensors only,
never pickle), a composed-base folder, or a derived base (a fine-tuned projector and LLM over any of these).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .bases import Base
from .composed import COMPOSED_FILE, VisionStub, load_composed
from .derived import apply_derived, is_derived, read_derived
from .files import atomic_write, cache_root
from .presets import (
    build_llava_7b_shape,
    build_llava_onevision_shape,
    build_qwen2_5_vl_shape,
    build_qwen3_vl_8b_shape,
    build_tiny,
)
from .prompting import fallback_template

PRESETS = ("tiny", "tiny-onevision", "small", "llava-1.5-7b-shape", "llava-onevision-0.5b-shape",
           "qwen2.5-vl-3b-shape", "qwen2.5-vl-7b-shape", "qwen3-vl-8b-shape")
SHAPES = {"llava-1.5-7b-shape": build_llava_7b_shape, "llava-onevision-0.5b-shape": build_llava_onevision_shape,
          "qwen2.5-vl-3b-shape": lambda: build_qwen2_5_vl_shape("3b"),
          "qwen2.5-vl-7b-shape": lambda: build_qwen2_5_vl_shape("7b"), "qwen3-vl-8b-shape": build_qwen3_vl_8b_shape}


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
        from .pretrained import small_base_dir  # converts once on first use

        base = load_composed(small_base_dir(), name="small", vision=vision, weights=weights, language=language)
    elif name in SHAPES:
        base = SHAPES[name]()
    else:
        path = fetch_s3_prefix(name) if name.startswith("s3://") else name
        if is_derived(path):  # the source base, then the fine-tuned projector and LLM over it
            meta = read_derived(path)
            if revision is not None and revision != meta["weights_sha256"][:16]:
                raise ValueError(f"{name}: revision {revision!r} asked for, the folder holds weights "
                                 f"{meta['weights_sha256'][:16]!r}; a derived base has no other revisions")
            source = load_base(meta["source"], meta["source_revision"], dtype, vision, weights, language)
            return apply_derived(source, path, meta, name, weights=weights and language)
        base = load_pretrained(name, revision=revision, dtype=dtype, weights=weights, path=path)
    if not vision and base.qwen:  # the merger is P and stays; the ViT's blocks go
        from .qwen import drop_encoder

        drop_encoder(base)
    elif not vision and not isinstance(base.vision_tower, VisionStub):
        owner = base.model if base.kind == "composed" else base.model.model
        owner.vision_tower = VisionStub(base.vision_config)
    if not language:  # frees the weights, keeps every shape and config
        # (a Qwen merger stays: it is part of the ViT, whose forward runs it)
        for module in (base.language_model, base.lm_head, *([] if base.qwen else [base.projector])):
            module.to("meta")
    if name not in SHAPES:  # the shape presets live on the meta device
        base.model.to(dtype)
    base.model.eval()
    base.model.requires_grad_(False)
    return base



def chat_template_of(path: str, tokenizer: Any, family: str, revision: str | None = None) -> str:
    """The chat template a checkpoint folder prompts with: the tokenizer's (llava-hf folders keep it in
    ``chat_template.jinja``, which the tokenizer reads), else an older folder's ``chat_template.json``, else the
    format the model family was trained with (``prompting.fallback_template``: Vicuna for LLaVA-1.5, ChatML for
    the Qwen2-based OneVision)."""
    from transformers.utils import cached_file

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    found = cached_file(path, "chat_template.json", revision=revision, _raise_exceptions_for_missing_entries=False)
    if found:
        return json.loads(Path(found).read_text())["chat_template"]
    return fallback_template(family)


# --- checkpoints: hub id, local folder, s3:// ---------------------------------------------------------

def load_pretrained(source: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                    weights: bool = True, path: str | None = None) -> Base:
    """Load a LLaVA / LLaVA-OneVision / Qwen2.5-VL / Qwen3-VL checkpoint or a ComposedVLM folder; safetensors only,
    never pickle.
    ``weights=False``: the model is built from its config on the meta device and no weight file is read."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    if path is None:  # load_base passes the folder it already mirrored
        path = fetch_s3_prefix(source) if source.startswith("s3://") else source
    if Path(path, COMPOSED_FILE).is_file():
        return load_composed(Path(path), name=source, weights=weights)
    if os.path.isdir(path) and not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json or {COMPOSED_FILE}; point --base at a model folder")
    config = AutoConfig.from_pretrained(path, revision=revision)
    classes = {"llava": LlavaForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration,
               "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}
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
    tok.chat_template = chat_template_of(path, tok, config.model_type, revision)
    proc = AutoImageProcessor.from_pretrained(path, revision=revision)
    # a Qwen base feeds its last ViT block, all tokens, through the merger (cli_module.qwen)
    return Base(name=source, kind=config.model_type, model=model, tokenizer=tok, image_processor=proc,
                image_token_id=config.image_token_id, select_layer=getattr(config, "vision_feature_layer", -1),
                select_strategy=getattr(config, "vision_feature_select_strategy", "full"), revision=revision)



def fetch_s3_prefix(uri: str) -> str:
    """Mirror an s3://bucket/prefix into the local cache (skipping files already there) and return the folder."""
    import boto3

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
        atomic_write(target, lambda tmp, key=obj["Key"]: s3.download_file(bucket, key, tmp))
    return str(dest)
