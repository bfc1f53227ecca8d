"""The methods of the fused model, one file each, behind one registry (as PEFT keeps its tuners): ``cli`` and
the baselines it is compared with. Adding a method adds a file here, a line in ``METHODS`` and its name in
``cli_module.config.Method``."""

from __future__ import annotations

from typing import get_args

from ..config import Method as MethodName
from .base import Injection, Method
from .cli import CLI
from .deepstack import DeepStack
from .input_fusion import FusionProjector, InputFusion
from .instruct import Instruct
from .llm_lora import LLMLoRA
from .projector_ft import ProjectorFT
from .shipped import Shipped

METHODS: dict[str, type[Method]] = {m.name: m for m in (CLI, Method, ProjectorFT, DeepStack, InputFusion, Instruct,
                                                  LLMLoRA, Shipped)}
assert set(METHODS) == set(get_args(MethodName)), "cli_module.config.Method and METHODS must list the same names"


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (ValueError naming the registered ones)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {list(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "FusionProjector", "Injection", "Method", "method_class"]
