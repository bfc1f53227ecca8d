"""Tiny random checkpoint folders in the llava-hf and Qwen hub layouts, for tests (a helper, not a test file).

``save_tiny_checkpoint(out, family)`` writes what ``llava-hf/llava-1.5-7b-hf`` (family ``"llava"``: CLIP
vision + Llama) or ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` (``"llava_onevision"``: SigLIP + Qwen2) ship,
at toy size (hidden 32, 2 layers, 16x16 images, patch 4): ``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files, ``preprocessor_config.json``, ``processor_config.json`` and,
unless ``chat_template=False``, the real llava-hf ``chat_template.jinja`` (from
``tests/fixtures/chat_templates/``). The tokenizer is byte-level (256 byte tokens, no merges), built locally,
with the family's specials: LLaVA-1.5's ``<unk> <s> </s> <pad> <image>`` (eos ``</s>``) or Qwen2's
``<|endoftext|> <|im_start|> <|im_end|>`` plus ``<image> <video>`` (eos ``<|im_end|>``, as Qwen2-Instruct's).
Like the hub tokenizers, it carries no chat template of its own.

Families ``"qwen2_5_vl"`` and ``"qwen3_vl"`` write what ``Qwen/Qwen2.5-VL-3B-Instruct`` and
``Qwen/Qwen3-VL-8B-Instruct`` ship, at toy size (``cli_module.presets.tiny_qwen_parts``: a 4-block ViT, a 3-layer
LLM 32 wide with M-RoPE; Qwen's image processor with a small ``max_pixels``, so an image takes 4 to 16 tokens):
Qwen2's specials plus ``<|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>`` and the family's chat
template (Qwen2.5-VL's as shipped; Qwen3-VL's reduced to its chat part, without tools and thinking), which writes
``<|vision_start|><|image_pad|><|vision_end|>`` per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["llava", "llava_onevision", "qwen2_5_vl", "qwen3_vl"]
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
TEMPLATE_FILES: dict[str, str] = {"llava": "llava-1.5.jinja", "llava_onevision": "llava-onevision.jinja",
                                  "qwen2_5_vl": "qwen2.5-vl.jinja", "qwen3_vl": "qwen3-vl.jinja"}
QWEN = ("qwen2_5_vl", "qwen3_vl")
IMAGE_SIZE, PATCH = 16, 4


def hub_chat_template(family: Family) -> str:
    """The llava-hf chat template of ``family``, exactly as the hub folder ships it."""
    return (TEMPLATES / TEMPLATE_FILES[family]).read_text()


def tiny_tokenizer(family: Family) -> Any:
    """A byte-level fast tokenizer with the family's special tokens and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "llava":
        specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
        named = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    elif family in QWEN:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
        named = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
        named = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **named)
    extra = [t for t in specials if t not in named.values()]
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def tiny_model(family: Family, tokenizer: Any, seed: int = 0) -> Any:
    """A random ``LlavaForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration`` at toy size (the
    tiny presets' shapes, with this tokenizer's vocabulary)."""
    from cli_module.presets import tiny_parts, tiny_qwen_parts

    return (tiny_qwen_parts if family in QWEN else tiny_parts)(family, tokenizer, seed)[0]


def tiny_image_processor(family: Family) -> Any:
    """CLIP's image processor (LLaVA-1.5) or OneVision's anyres one, at 16 px (PIL: no torchvision)."""
    from cli_module.presets import tiny_image_processor as preset
    from cli_module.presets import tiny_qwen_image_processor

    return tiny_qwen_image_processor(family) if family in QWEN else preset(family)


def processor_config(family: Family) -> dict[str, Any]:
    """``processor_config.json`` as llava-hf folders have it (flat; the image processor has its own file)."""
    if family in QWEN:
        name = "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen3VLProcessor"
        return {"processor_class": name, "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    if family == "llava":
        return {"processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": PATCH,
                "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"}
    return {"processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
            "num_image_tokens": (IMAGE_SIZE // PATCH) ** 2, "vision_feature_select_strategy": "full"}


def save_tiny_checkpoint(out: Path, family: Family, chat_template: bool = True, *, seed: int = 0,
                         template_format: Literal["jinja", "json"] = "jinja") -> Path:
    """Write a tiny random ``family`` checkpoint folder in the hub's layout to ``out`` and return ``out``.

    ``chat_template=False`` leaves the template out (a folder that needs the family's fallback format);
    ``template_format="json"`` writes it as older hub folders do, ``chat_template.json`` =
    ``{"chat_template": ...}``, instead of ``chat_template.jinja``. The files are written one by one, not
    through the processor's ``save_pretrained``: ``LlavaOnevisionProcessor`` cannot be built without
    torchvision (its video processor), and transformers 5 would nest the image processor's settings into
    ``processor_config.json``. ``AutoTokenizer.from_pretrained(out)`` reads ``chat_template.jinja`` but not
    ``chat_template.json``; ``AutoProcessor.from_pretrained(out)`` reads both (for OneVision it needs
    torchvision)."""
    if family not in TEMPLATE_FILES:
        raise ValueError(f"family {family!r} is not one of {sorted(TEMPLATE_FILES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(family)
    tiny_model(family, tok, seed).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    tiny_image_processor(family).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(processor_config(family), indent=2) + "\n")
    if chat_template and template_format == "jinja":
        (out / "chat_template.jinja").write_text(hub_chat_template(family))
    elif chat_template:
        payload = {"chat_template": hub_chat_template(family)}
        (out / "chat_template.json").write_text(json.dumps(payload, indent=2) + "\n")
    return out
