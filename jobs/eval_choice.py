"""Likelihood scoring of candidate answers (``crosslayer eval --scoring choice``), as multiple-choice VLM
benchmarks (MMBench, SEED-Bench, ScienceQA) are scored without generation.

Each candidate's score is the log-probability of its tokens after the prompt, summed:
    score(c) = sum_j log p(c_j | prompt, image, c_<j)
and the prediction is the candidate with the highest score. Cost: one prefill per question, then one forward
over every candidate of the batch at once, each candidate row reading its question's prompt from the shared KV
cache (the prompt's keys and values are gathered per candidate row, never recomputed) and, for CLI, its image's
AGF keys and values computed once in the prefill's visual state.

A candidate's tokens are those the model was trained to produce: the chat template renders the dialogue with the
candidate as the assistant's reply, the reply starts where the template's generation prompt ends (as training
labels it, ``cli_module.prompting``), and the end-of-turn marker is not scored. The tokens come from one
tokenization of prompt + reply (offsets split them), so a token merged across the boundary is never split.
The LM head runs in fp32 whatever the model's dtype: bf16 logits step by 0.125 at |16| to 32, and a fifth of
the small base's questions then had candidates tied at the top (bench/RESULTS.md, "Quality").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


def continuation_ids(tokenizer: Any, messages: list[dict[str, str]], candidate: str, *,
                     family: str | None = None) -> list[int]:
    """The token ids of ``candidate`` as the assistant's reply to ``messages`` (see the module docstring)."""
    from cli_module.prompting import render

    reply = candidate.strip()
    if not reply:
        raise ValueError("an empty candidate answer cannot be scored")
    prompt = render(tokenizer, messages, add_generation_prompt=True, family=family)
    full = render(tokenizer, [*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False,
                  family=family)
    if not full.startswith(prompt):
        raise ValueError(f"the chat template renders the prompt as {prompt[-60:]!r}, which does not begin the "
                         f"dialogue with a reply {full[len(prompt) - 60:len(prompt) + 20]!r}")
    end = full.find(reply, len(prompt))
    if end < 0:
        raise ValueError(f"candidate {reply!r} is missing from the rendered reply {full[len(prompt):][:80]!r}")
    text = full[: end + len(reply)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [t for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]) if start >= len(prompt)]
    if not ids:
        raise ValueError(f"candidate {reply!r} tokenizes to nothing after the prompt")
    return ids


@torch.no_grad()
def score_continuations(model: Any, inputs: dict[str, torch.Tensor], visual: Any,
                        continuations: list[list[list[int]]], max_rows: int = 64) -> list[list[float]]:
    """Summed log-probabilities of each question's candidate continuations.

    inputs: left-padded prompts (``FusedVLM.prepare_inputs``) with their ``visual`` state (or None);
    continuations[b][c]: token ids of candidate c of prompt b. Candidate rows are scored ``max_rows`` at a time.
    """
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # (B, S)
    cache = DynamicCache(config=model.base.text_config)
    first = model(ids, mask, visual=visual, cache=cache, use_cache=True, logits_to_keep=1,
                  float_logits=True).logits[:, -1]  # (B, V)
    first = F.log_softmax(first.float(), dim=-1)
    owner = [b for b, cands in enumerate(continuations) for _ in cands]  # candidate row -> its prompt
    flat = [c for cands in continuations for c in cands]
    scores = [float(first[owner[i], c[0]]) for i, c in enumerate(flat)]  # the first token's log-prob
    longer = [i for i, c in enumerate(flat) if len(c) > 1]
    for at in range(0, len(longer), max_rows):
        rows = longer[at: at + max_rows]
        index = torch.tensor([owner[i] for i in rows], device=ids.device)
        width = max(len(flat[i]) for i in rows) - 1
        pad = model.base.tokenizer.pad_token_id or 0
        step = torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device)  # (R, W) right-padded
        step_mask = torch.zeros_like(step)
        for r, i in enumerate(rows):
            feed = flat[i][:-1]  # token j predicts token j + 1
            step[r, : len(feed)] = torch.tensor(feed, device=ids.device)
            step_mask[r, : len(feed)] = 1
        out = model(step, torch.cat([mask[index], step_mask], dim=1), visual=_rows_of(visual, index),
                    cache=_gather(cache, index, model.base.text_config), use_cache=True, float_logits=True)
        logp = F.log_softmax(out.logits.float(), dim=-1)  # (R, W, V)
        for r, i in enumerate(rows):
            targets = torch.tensor(flat[i][1:], device=ids.device)
            scores[i] += float(logp[r, torch.arange(len(targets), device=ids.device), targets].sum())
    out_scores, k = [], 0
    for cands in continuations:
        out_scores.append(scores[k: k + len(cands)])
        k += len(cands)
    return out_scores


def _gather(cache: Any, index: torch.Tensor, config: Any) -> Any:
    """A new KV cache whose row r is row ``index[r]`` of ``cache`` (the prompt cache itself stays as it is)."""
    from transformers import DynamicCache

    out = DynamicCache(config=config)
    for layer, cached in enumerate(cache.layers):
        out.update(cached.keys[index], cached.values[index], layer)
    return out


def _rows_of(visual: Any, index: torch.Tensor) -> Any:
    """The visual state with row r holding prompt ``index[r]``'s image (AGF keys/values, AMP tokens; a Qwen
    image's grid, M-RoPE delta and key mask); the input image embeddings (and Qwen3-VL's DeepStack inputs, added
    at image positions) are not needed after the prefill."""
    if visual is None:
        return None
    if visual.rows is not None:
        raise ValueError("likelihood scoring takes batches whose prompts all have an image, or none")
    from dataclasses import replace

    return replace(visual, image_embeds=None, tokens=None if visual.tokens is None else visual.tokens[index],
                   kv=[(k[index], v[index]) for k, v in visual.kv],
                   counts=[visual.counts[i] for i in index.tolist()],
                   grids=None if visual.grids is None else visual.grids[index.to(visual.grids.device)],
                   rope_deltas=None if visual.rope_deltas is None else visual.rope_deltas[index.to(
                       visual.rope_deltas.device)],
                   token_mask=None if visual.token_mask is None else visual.token_mask[index],
                   deepstack_embeds=None)
