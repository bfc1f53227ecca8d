"""Likelihood scoring (jobs/eval_choice.py): candidate scores computed by hand on a rigged tiny checkpoint, and
equal to a plain full forward of prompt + candidate (no cache) on a CLI model with non-zero plug-in weights,
for several questions with different numbers of candidates scored in chunks."""

from __future__ import annotations

import math

import pytest
import torch
from benchmark_files import VOCAB, rigged_checkpoint, rigged_logprob
from conftest import perturb, random_images
from hub_checkpoints import save_tiny_checkpoint
from torch.nn import functional as F

from cli_module.adapter import load_model
from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from cli_module.prompting import render
from jobs.eval_choice import continuation_ids, score_continuations


def test_scores_by_hand_on_the_rigged_model(tmp_path):
    # every position's logits: 2.0 for "y", 0 for the 260 other tokens, so log p("y") = 2 - log(e^2 + 260)
    model, _ = load_model(None, str(rigged_checkpoint(tmp_path / "ckpt", "y", 2.0)))
    tok = model.base.tokenizer
    log_z = math.log(math.exp(2.0) + VOCAB - 1)
    dialogue = [{"role": "user", "content": "<image>\nIs it a dog?"}]
    cands = ["yes", "no", "yy"]
    conts = [continuation_ids(tok, dialogue, c, family="llava") for c in cands]
    assert [tok.convert_ids_to_tokens(c) for c in conts] == [["Ġ", "y", "e", "s"], ["Ġ", "n", "o"], ["Ġ", "y", "y"]]
    inputs, visual = model.prepare_inputs([render(tok, dialogue, True)], images=random_images(1))
    (scores,) = score_continuations(model, inputs, visual, [conts])
    by_hand = [2.0 - 4 * log_z, -3 * log_z, 4.0 - 3 * log_z]
    assert scores == pytest.approx(by_hand, abs=1e-4)
    assert scores == pytest.approx([rigged_logprob(list(" " + c), "y", 2.0) for c in cands], abs=1e-4)
    assert max(range(3), key=scores.__getitem__) == 2  # "yy": shortest among the best


def test_shared_prefill_equals_a_full_forward_per_candidate(tiny_base):
    model = FusedVLM(tiny_base, CLIConfig(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4,
                                          lora_rank=4, pool=2))
    perturb(model)  # non-zero AGF / AMP weights: the candidates' rows must read their own image's AGF keys
    tok = tiny_base.tokenizer
    dialogues = [[{"role": "user", "content": "<image>\nWhat colour is it?"}],
                 [{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "And now?"}]]
    cands = [["red", "a green one", "blue"], ["3", "three or four"]]
    conts = [[continuation_ids(tok, d, c) for c in cs] for d, cs in zip(dialogues, cands)]
    prompts = [render(tok, d, True) for d in dialogues]
    images = random_images(2, seed=3)
    inputs, visual = model.prepare_inputs(prompts, images=images)
    scores = score_continuations(model, inputs, visual, conts, max_rows=2)  # 5 candidate rows: 3 chunks
    for b in range(2):
        one, one_visual = model.prepare_inputs([prompts[b]], images=[images[b]])
        n = one["input_ids"].shape[1]
        for c, cont in enumerate(conts[b]):
            ids = torch.cat([one["input_ids"], torch.tensor([cont])], dim=1)
            with torch.no_grad():
                logp = F.log_softmax(model(ids, torch.ones_like(ids), visual=one_visual).logits[0].float(), -1)
            full = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont))
            assert scores[b][c] == pytest.approx(full, abs=1e-4)


def test_bf16_models_score_with_fp32_logits():
    """A bf16 model with logits in the tens (bf16 steps by 0.125 there): scores equal the fp32 head over the same
    bf16 hidden states, not bf16 logits, so candidates do not tie on the bf16 grid."""
    model = FusedVLM(load_base("tiny"), CLIConfig(method="one_to_one")).to(torch.bfloat16)
    with torch.no_grad():
        model.base.lm_head.weight.mul_(300)
    tok = model.base.tokenizer
    dialogue = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    cands = ["red", "green", "blue", "a red one"]
    conts = [continuation_ids(tok, dialogue, c) for c in cands]
    prompt, image = render(tok, dialogue, True), random_images(1, seed=5)
    inputs, visual = model.prepare_inputs([prompt], images=image)
    (scores,) = score_continuations(model, inputs, visual, [conts])
    n = inputs["input_ids"].shape[1]
    for c, cont in enumerate(conts):
        ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
        with torch.no_grad():
            out = model(ids, torch.ones_like(ids), visual=visual, float_logits=True)
            plain = model(ids, torch.ones_like(ids), visual=visual).logits
        assert out.logits.dtype == torch.float32 and plain.dtype == torch.bfloat16
        assert float(out.logits.abs().mean()) > 16  # where bf16's step is 0.125 or more
        assert float((out.logits - plain.float()).abs().max()) > 0.01  # the bf16 logits are rounded
        logp = F.log_softmax(out.logits[0], -1)
        assert scores[c] == pytest.approx(sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont)), abs=1e-3)
    assert len(set(scores)) == len(scores)


def test_the_reply_is_scored_without_the_end_of_turn_marker(tmp_path):
    base = load_base(str(save_tiny_checkpoint(tmp_path / "ov", "llava_onevision")))
    ids = continuation_ids(base.tokenizer, [{"role": "user", "content": "<image>\nWhat?"}], "no",
                           family="llava_onevision")
    assert base.tokenizer.convert_ids_to_tokens(ids) == ["n", "o"]  # ChatML: the reply follows "assistant\n"
    with pytest.raises(ValueError, match="an empty candidate answer cannot be scored"):
        continuation_ids(base.tokenizer, [{"role": "user", "content": "Q"}], "  ", family="llava_onevision")
