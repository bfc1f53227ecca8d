"""Bases built in code: ``tiny`` / ``tiny-onevision`` (random LLaVA-1.5 = CLIP + Llama and LLaVA-OneVision =
SigLIP + Qwen2, hidden size 32, two layers, 16x16 images, a locally built byte-level tokenizer; for tests) and
``llava-1.5-7b-shape`` (LLaVA-1.5-7B's published shapes on the meta device; parameter counts only).
"""

from __future__ import annotations

from typing import Any

import torch

from .bases import Base, Kind

TINY_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]  # OneVision's anyres grid at toy size: 1-2 tiles a side
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


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
    tok = build_tiny_tokenizer()
    model, processor = tiny_parts(kind, tok, seed)
    config = model.config
    return Base(name="tiny" if kind == "llava" else "tiny-onevision", kind=kind, model=model, tokenizer=tok,
                image_processor=processor, image_token_id=config.image_token_id,
                select_layer=config.vision_feature_layer, select_strategy=config.vision_feature_select_strategy,
                revision=f"seed{seed}")


def tiny_parts(kind: Kind, tokenizer: Any, seed: int = 0) -> tuple[Any, Any]:
    """-> (random model, image processor) of the tiny LLaVA-1.5 (CLIP + Llama) or LLaVA-OneVision (SigLIP + Qwen2):
    hidden size 32, two layers, 16x16 images in 4x4 patches, the vocabulary of ``tokenizer`` (which must hold
    ``<image>``; ``<video>`` too, if OneVision's video token should be a real one)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = tokenizer
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
            return LlavaForConditionalGeneration(config), tiny_image_processor(kind)
        video = {"video_token_id": tok.convert_tokens_to_ids("<video>")} if "<video>" in tok.get_vocab() else {}
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                      image_token_id=image_token_id, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", image_grid_pinpoints=TINY_PINPOINTS, **video)
        return LlavaOnevisionForConditionalGeneration(config), tiny_image_processor(kind)


def tiny_image_processor(kind: Kind) -> Any:
    """CLIP's image processor (LLaVA-1.5) or OneVision's anyres one, at 16 px (the PIL ones: no torchvision)."""
    from transformers import CLIPImageProcessorPil, LlavaOnevisionImageProcessorPil

    if kind == "llava":
        return CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=TINY_PINPOINTS)


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


def build_llava_onevision_shape() -> Base:
    """LLaVA-OneVision-0.5B's shapes as converted on the hub (``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``:
    SigLIP-so400m with 26 layers, 384 px, patch 14 -> a 27x27 grid; Qwen2-0.5B) on the meta device."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14)
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=152000, max_position_embeddings=32768,
                       tie_word_embeddings=True)
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=151646,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9")
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    return Base(name="llava-onevision-0.5b-shape", kind="llava_onevision", model=model, tokenizer=None,
                image_processor=None, image_token_id=151646, select_layer=-1, select_strategy="full")


# --- Qwen2.5-VL / Qwen3-VL ------------------------------------------------------------------------------

QWEN_IMAGE = {"qwen2_5_vl": dict(patch_size=14), "qwen3_vl": dict(patch_size=16)}  # merge 2: 28 / 32 px units


def tiny_qwen_parts(kind: Kind, tokenizer: Any, seed: int = 0) -> tuple[Any, Any]:
    """-> (random model, image processor) of a tiny Qwen2.5-VL or Qwen3-VL: a 4-block ViT 16 wide (Qwen2.5-VL:
    blocks 1 and 3 full attention, the others in windows of 2x2 merged tokens; Qwen3-VL: DeepStack from blocks 1
    and 2 into decoder layers 0 and 1), a 3-layer LLM 32 wide with M-RoPE sections [2, 1, 1] of its 8-wide heads,
    images of 4 to 16 tokens (``tiny_qwen_image_processor``). ``tokenizer`` must hold Qwen's vision specials."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = dict(depth=4, hidden_size=16, intermediate_size=32, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, **QWEN_IMAGE[kind])
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "qwen2_5_vl":
            config = Qwen2_5_VLConfig(vision_config={**vision, "window_size": 56, "fullatt_block_indexes": [1, 3]},
                                      text_config=text, **ids)
            model = Qwen2_5_VLForConditionalGeneration(config)
        else:
            text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
            config = Qwen3VLConfig(vision_config={**vision, "num_position_embeddings": 16,
                                                  "deepstack_visual_indexes": [1, 2]},
                                   text_config={**text, "head_dim": 8}, **ids)
            model = Qwen3VLForConditionalGeneration(config)
    return model, tiny_qwen_image_processor(kind)


def tiny_qwen_image_processor(kind: Kind, max_pixels: int | None = None) -> Any:
    """Qwen's image processor (PIL backend: no torchvision) at toy size: between 4x4 and 8x8 patches (4 to 16
    merged tokens) unless ``max_pixels`` says otherwise."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = QWEN_IMAGE[kind]["patch_size"] * 2  # patch x merge
    return Qwen2VLImageProcessorPil(min_pixels=(2 * unit) ** 2, max_pixels=max_pixels or (4 * unit) ** 2,
                                    patch_size=QWEN_IMAGE[kind]["patch_size"], merge_size=2, temporal_patch_size=2)


QWEN2_5_VL_TEXT = {  # the LLMs of Qwen2.5-VL-3B / -7B-Instruct as published (config.json on the hub)
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def build_qwen2_5_vl_shape(size: str) -> Base:
    """Qwen2.5-VL-3B / -7B-Instruct's published shapes (``config.json`` on the hub: a 32-block ViT 1280 wide, patch
    14, windows of 112 px with full attention in blocks 7, 15, 23, 31; Qwen2.5-3B's LLM, 36 layers 2048 wide, or
    Qwen2.5-7B's, 28 layers 3584 wide) on the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(QWEN2_5_VL_TEXT[size])
    tied = text.pop("tie_word_embeddings")
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
    text.update(max_position_embeddings=128000, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return Base(name=f"qwen2.5-vl-{size}-shape", kind="qwen2_5_vl", model=model, tokenizer=None,
                image_processor=None, image_token_id=151655, select_layer=-1, select_strategy="full")


def build_qwen3_vl_8b_shape() -> Base:
    """Qwen3-VL-8B-Instruct's published shapes (a 27-block ViT 1152 wide, patch 16, DeepStack from blocks 8, 16,
    24; Qwen3-8B's LLM, 36 layers, 4096 wide, GQA 32/8) on the meta device."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
    text = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    return Base(name="qwen3-vl-8b-shape", kind="qwen3_vl", model=model, tokenizer=None, image_processor=None,
                image_token_id=151655, select_layer=-1, select_strategy="full")
