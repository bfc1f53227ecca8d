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
