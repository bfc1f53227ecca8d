"""The test reference for every decoding test: a plain greedy loop over the fused model's forward, one row batch
at a time, with the base's own KV cache (``DynamicCache``) or none. The product decodes only through the engine
(``pipelines.serve_engine``); this loop is what the engine's answers are compared with."""

from __future__ import annotations

import torch
from transformers import DynamicCache


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, visual=None,
           pixel_values: torch.Tensor | None = None, max_new_tokens: int = 8, eos_token_id: int | None = None,
           use_cache: bool = True) -> torch.Tensor:
    """-> new tokens (B, T) (a finished row repeats its EOS); the image placeholder is never chosen."""
    if visual is None and pixel_values is not None:
        visual = model.prepare_visual(model.encode_images(pixel_values))
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    cache = DynamicCache(config=model.base.text_config) if use_cache else None
    seq, step_ids, out = input_ids, input_ids, []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(step_ids, mask, visual=visual, cache=cache, use_cache=use_cache,
                       logits_to_keep=1).logits[:, -1].float()
        logits[:, model.base.image_token_id] = float("-inf")
        token = logits.argmax(-1)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        out.append(token)
        if bool(finished.all()):
            break
        seq = torch.cat([seq, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
        step_ids = token[:, None] if use_cache else seq
    return torch.stack(out, 1)


def answer(tokens: list[int], eos: int | None) -> list[int]:
    """A row's tokens up to and including its EOS."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens
