"""Batch generation for caption and eval (pipelines/generation.py), through the engine in process: greedy equals
the reference greedy loop, a seed makes sampling reproducible, stop strings cut the text and end decoding at the
token that completed them."""

from __future__ import annotations

import pytest
from conftest import perturb, random_images
from reference_decode import answer, greedy

from cli_module.config import CLIConfig
from cli_module.model import FusedVLM
from cli_module.prompting import chat_prompt
from pipelines.generation import Sampling, complete


@pytest.fixture(scope="module")
def model_and_inputs():
    from cli_module.loading import load_base

    base = load_base("tiny")
    model = FusedVLM(base, CLIConfig(vision_layers=[1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4))
    perturb(model)
    prompts = [chat_prompt(base.tokenizer, q) for q in ("What is it?", "Describe the picture in detail.")]
    return model, *model.prepare_inputs(prompts, images=random_images(2, seed=5))


def test_greedy_matches_the_reference_loop_and_counts_tokens(model_and_inputs):
    model, inputs, visual = model_and_inputs
    tok = model.base.tokenizer
    done = complete(model, inputs, visual, Sampling(max_new_tokens=6))
    tokens = greedy(model, **inputs, visual=visual, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    for row, c in zip(tokens.tolist(), done):
        used = answer(row, tok.eos_token_id)
        assert c.text == tok.decode(used, skip_special_tokens=True).strip() and c.tokens == len(used)
        assert c.finish_reason == ("stop" if tok.eos_token_id in used else "length")


def test_seeded_sampling_is_reproducible(model_and_inputs):
    model, inputs, visual = model_and_inputs
    hot = dict(max_new_tokens=8, temperature=1.5, top_p=0.95)
    first = complete(model, inputs, visual, Sampling(seed=7, **hot))
    again = complete(model, inputs, visual, Sampling(seed=7, **hot))
    other = complete(model, inputs, visual, Sampling(seed=8, **hot))
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]


def test_stop_strings_cut_the_text_and_end_decoding(model_and_inputs):
    model, inputs, visual = model_and_inputs
    tok = model.base.tokenizer
    full = complete(model, inputs, visual, Sampling(max_new_tokens=10))
    ids = answer(greedy(model, **inputs, visual=visual, max_new_tokens=10, eos_token_id=tok.eos_token_id)[0].tolist(),
                 tok.eos_token_id)
    text = full[0].text
    stop = text[2:4]  # a stop string the first row's greedy text holds
    assert len(stop) == 2
    cut = complete(model, inputs, visual, Sampling(max_new_tokens=10, stop=[stop]))
    assert cut[0].text == text[: text.find(stop)].strip() and cut[0].finish_reason == "stop"
    # decoding ended at the token that completed the stop string, not later
    completes = next(t for t in range(1, len(ids) + 1) if stop in tok.decode(ids[:t], skip_special_tokens=True))
    assert cut[0].tokens == completes < 10


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, r"max_new_tokens \(0\) must be >= 1"),
    ({"temperature": -1.0}, r"temperature \(-1.0\) must be in \[0, 2\]"),
    ({"temperature": 2.5}, r"temperature \(2.5\) must be in \[0, 2\]"),
    ({"top_p": 0.0}, r"top_p \(0.0\) must be in \(0, 1\]"),
    ({"stop": [""]}, "stop strings must be non-empty"),
])
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
