"""llm_lora, the LoRA-on-the-LLM baseline (PEFT): the base exactly at zero init, its parameter count by the
LoRA formula, adapter files that round-trip without touching a shared base, its own learning-rate group, and
its settings refused on other methods."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images

from cli_module.adapter import load_model, save_adapter
from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from cli_module.prompting import chat_prompt

LORA = dict(method="llm_lora", llm_lora_rank=2, llm_lora_alpha=4.0)


def inputs_for(model, n=2):
    prompts = [chat_prompt(model.base.tokenizer, "what is this" + "?" * i) for i in range(n)]
    return model.prepare_inputs(prompts, images=random_images(n, 0))


def test_zero_init_is_the_base_and_counts_lora_parameters():
    base = load_base("tiny")  # a fresh base: llm_lora inserts its modules into it
    ref = FusedVLM(load_base("tiny"), CLIConfig(method="one_to_one"))
    model = FusedVLM(base, CLIConfig(**LORA))
    (inputs, visual), (ref_inputs, ref_visual) = inputs_for(model), inputs_for(ref)
    assert torch.equal(model(**inputs, visual=visual).logits, ref(**ref_inputs, visual=ref_visual).logits)
    lm = base.language_model
    linears = [m for layer in lm.layers for name, m in layer.named_modules()
               if name.rsplit(".", 1)[-1] in CLIConfig().llm_lora_targets and hasattr(m, "base_layer")]
    assert len(linears) == 7 * len(lm.layers)
    want = sum(2 * (m.base_layer.in_features + m.base_layer.out_features) for m in linears)
    assert model.param_counts()["trainable_params"] == want
    state = model.adapter_state_dict()
    assert sum(v.numel() for v in state.values()) == want and all(k.startswith("llm_lora.layers.") for k in state)
    with pytest.raises(ValueError, match="already carries LoRA weights"):
        FusedVLM(base, CLIConfig(**LORA))


def test_adapter_round_trip_leaves_a_shared_base_alone(tmp_path):
    model = FusedVLM(load_base("tiny"), CLIConfig(**LORA))
    with torch.no_grad():
        for p in model.method.base_parameters(model).values():
            p.normal_(0, 0.5)
    (inputs, visual) = inputs_for(model)
    want = model(**inputs, visual=visual).logits
    save_adapter(model, tmp_path)
    shared = load_base("tiny")
    loaded, _ = load_model(tmp_path, shared=shared)
    assert loaded.base is not shared  # a fresh base: the LoRA weights go inside it
    assert not any("lora_" in n for n, _ in shared.language_model.named_parameters())
    (inputs, visual) = inputs_for(loaded)
    got = loaded(**inputs, visual=visual).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    plain = FusedVLM(shared, CLIConfig(method="one_to_one"))
    (inputs, visual) = inputs_for(plain)
    assert (plain(**inputs, visual=visual).logits - want).abs().max() > 1e-3  # the LoRA weights did change it


def test_lora_params_train_in_the_llm_group_not_the_gate_group():
    from jobs.train_config import OptimArgs
    from jobs.train_loop import param_groups

    model = FusedVLM(load_base("tiny"), CLIConfig(**LORA))  # gate_proj (the MLP's) is a LoRA target
    groups = {g["name"]: g for g in param_groups(model, OptimArgs(lm_lr_scale=0.5, lr=1e-3))}
    assert set(groups) == {"lm"} and groups["lm"]["lr"] == 5e-4
    assert len(groups["lm"]["params"]) == len(model.method.base_parameters(model))
    with pytest.raises(ValueError, match="optim.gate_lr_scale=2.0 but this model trains no AGF gate"):
        param_groups(model, OptimArgs(gate_lr_scale=2.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="cli", llm_lora_rank=4), r"\['llm_lora_rank'\] set, but they configure method 'llm_lora'"),
    (dict(method="llm_lora", llm_lora_rank=0), "llm_lora_rank >= 1, got 0"),
    (dict(method="llm_lora", llm_lora_targets=[]), "at least one module name"),
    (dict(method="llm_lora", llm_lora_alpha=-1.0), "llm_lora_alpha must be > 0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIConfig(**kwargs)


def test_unknown_target_module_is_refused():
    with pytest.raises(ValueError, match=r"llm_lora_targets \['qkv'\] name no module.*q_proj"):
        FusedVLM(load_base("tiny"), CLIConfig(method="llm_lora", llm_lora_targets=["qkv"]))


def test_engine_decodes_llm_lora_as_the_reference_loop():
    """The engine (serving, captioning, evaluation) runs the LoRA'd decoder: greedy answers equal the plain loop's."""
    from reference_decode import answer, greedy

    from pipelines.generation import Sampling, complete

    model = FusedVLM(load_base("tiny"), CLIConfig(**LORA))
    with torch.no_grad():
        for p in model.method.base_parameters(model).values():
            p.normal_(0, 0.5)
    inputs, visual = inputs_for(model)
    tok = model.base.tokenizer
    done = complete(model, inputs, visual, Sampling(max_new_tokens=6))
    tokens = greedy(model, **inputs, visual=visual, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    for row, c in zip(tokens.tolist(), done):
        assert c.text == tok.decode(answer(row, tok.eos_token_id), skip_special_tokens=True).strip()
