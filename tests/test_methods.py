"""The method registry (cli_module/methods): every method the config names is registered, each keeps the tensor
names its adapter files use, and each trains exactly its own part."""

from __future__ import annotations

from typing import get_args

import pytest

from cli_module.config import CLIConfig, Method
from cli_module.methods import METHODS, method_class
from cli_module.model import FusedVLM

CFG = dict(vision_layers=[1, 2], inject_layers=[0, 1], attn_dim=16, heads=2, lora_rank=4)

# adapter tensor-name prefixes by method: what adapter files written before the registry hold
PREFIXES = {"cli": {"amp", "agf"}, "deepstack": {"amp", "deepstack_out"}, "input_fusion": {"fusion_projector"},
            "projector_ft": {"projector"}, "one_to_one": set(), "instruct": set(), "llm_lora": {"llm_lora"},
            "shipped": set()}


def test_registry_lists_every_method_the_config_accepts():
    assert list(METHODS) and set(METHODS) == set(get_args(Method))
    assert all(method_class(name).name == name for name in METHODS)
    with pytest.raises(ValueError, match=r"method='lora' is not one of \['cli'"):
        method_class("lora")


@pytest.mark.parametrize("name", sorted(PREFIXES))
def test_each_method_keeps_its_adapter_names_and_trains_its_own_part(tiny_base, name):
    from cli_module.loading import load_base

    base = load_base("tiny") if METHODS[name].modifies_base else tiny_base  # llm_lora inserts into its base
    model = FusedVLM(base, CLIConfig(method=name, **CFG))
    assert type(model.method) is METHODS[name]
    assert {k.split(".")[0] for k in model.adapter_state_dict()} == PREFIXES[name]
    trainable = {n.removeprefix("base_model.").removeprefix("model.").split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    expected = {"instruct": {"multi_modal_projector", "language_model", "lm_head"},
                "projector_ft": {"multi_modal_projector"}, "llm_lora": {"language_model"}}.get(name, PREFIXES[name])
    assert trainable == expected, trainable
    assert bool(model._hooks) == (name in ("cli", "deepstack"))
    assert model.vision_layers == ([1, 2] if name in ("cli", "deepstack", "input_fusion") else [])
