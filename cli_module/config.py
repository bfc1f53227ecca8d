"""CLIConfig: every setting of the Cross-Layer Injection plug-in (AMP + AGF) and of its baselines.

The config is checked twice: on its own in ``__post_init__`` (types, enums, ranks) and against a concrete
base in ``validate_for`` (layer indices against the encoder and decoder depths, token grid against pooling),
so a wrong value fails before any weight is built, with the numbers in the message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Method = Literal["cli", "one_to_one", "projector_ft", "deepstack", "input_fusion", "instruct", "llm_lora", "shipped"]
Gate = Literal["layer", "channel", "none"]
Positions = Literal["all", "text", "image"]
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class CLIConfig:
    method: Method = "cli"  # cli, a baseline (one_to_one, projector_ft, deepstack, input_fusion, llm_lora, shipped),
    #                         or instruct (P + LLM): one file each in cli_module/methods. On Qwen3-VL every method but
    #                         one_to_one keeps the base's own DeepStack; shipped is that base as published
    vision_layers: list[int] = field(default_factory=lambda: [-2, -5, -8, -11])  # K: hidden_states indices
    lora_rank: int = 16  # AMP low-rank adapter rank r (B_k A_k V_k); 0 disables the adapter (P only)
    lora_alpha: float = 32.0  # AMP scale is alpha / rank, as in LoRA
    pool: int = 1  # average-pool the visual token grid by pool x pool before AMP (1 = off, 2 = OneVision's 2x2)
    inject_layers: list[int] = field(default_factory=lambda: [0, 4, 8, 12])  # T: decoder layer indices
    heads: int = 4  # AGF cross-attention heads (must divide attn_dim)
    attn_dim: int = 256  # AGF query/key/value width (a bottleneck: keeps 7B-scale bases under 1% trainable)
    gate: Gate = "layer"  # gate per vision layer (scalar), per channel, or none (always 1: AMP only)
    gate_init: float = 0.0  # initial gate bias b_k: every gate opens sigmoid(gate_init) at step 0 (0 -> half)
    positions: Positions = "all"  # which sequence positions receive the AGF update
    dropout: float = 0.0  # dropout on AMP inputs and AGF attention output (llm_lora: on its LoRA input) in training
    llm_lora_rank: int = 8  # method llm_lora: rank of the LoRA (PEFT) on the LLM's linear layers
    llm_lora_alpha: float = 16.0  # method llm_lora: its scale is alpha / rank
    llm_lora_targets: list[str] = field(default_factory=lambda: list(LLM_LORA_TARGETS))  # method llm_lora: the
    #                         decoder layers' linear modules it adapts (every layer)

    def __post_init__(self) -> None:
        _check_literal("method", self.method, Method)
        _check_literal("gate", self.gate, Gate)
        _check_literal("positions", self.positions, Positions)
        self.vision_layers = [int(k) for k in self.vision_layers]
        self.inject_layers = [int(t) for t in self.inject_layers]
        for name in ("vision_layers", "inject_layers"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}; list each layer once")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1 (1 = no pooling), got {self.pool}")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.attn_dim < 1 or self.attn_dim % self.heads:
            raise ValueError(f"attn_dim={self.attn_dim} must be a positive multiple of heads={self.heads}")
        if not -20.0 <= self.gate_init <= 20.0:
            raise ValueError(f"gate_init must be in [-20, 20] (a logit: sigmoid(20) is already 1.0), got {self.gate_init}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.llm_lora_targets = [str(t) for t in self.llm_lora_targets]
        if self.llm_lora_alpha <= 0:
            raise ValueError(f"llm_lora_alpha must be > 0, got {self.llm_lora_alpha}")
        lora_set = [  # llm_lora fields moved off their declared defaults
            f.name for f in dataclasses.fields(self) if f.name.startswith("llm_lora_") and getattr(self, f.name)
                    != (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)]
        if self.method != "llm_lora" and lora_set:
            raise ValueError(f"{lora_set} set, but they configure method 'llm_lora' and "
                             f"this config's method is {self.method!r}; set method=llm_lora or leave them unset")
        from .methods import method_class  # the method's own checks (methods import this module)

        method_class(self.method).check(self)

    def validate_for(self, vision_layers: int, text_layers: int, grid: int | None) -> None:
        """Check indices against a base: ``vision_layers``/``text_layers`` are depths, ``grid`` the token side."""
        from .methods import method_class

        if not method_class(self.method).reads_layers:
            return  # reads no extra vision layer and hooks no decoder layer
        resolve_vision_layers(self.vision_layers, vision_layers)
        for t in self.inject_layers:
            if not 0 <= t < text_layers:
                raise ValueError(
                    f"inject layer {t} is out of range for a decoder with {text_layers} layers: "
                    f"use 0..{text_layers - 1}"
                )
        if self.pool > 1:
            if grid is None:
                raise ValueError("pool > 1 needs a square token grid, and this encoder's is unknown; use pool=1")
            if grid % self.pool:
                raise ValueError(f"pool={self.pool} does not divide the {grid}x{grid} visual token grid")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CLIConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


def resolve_vision_layers(vision_layers: list[int], depth: int) -> list[int]:
    """hidden_states indices (0 = embeddings, negative counts from the end) of an encoder with ``depth`` layers,
    made non-negative; refuses an index out of range or a layer named twice. The one place indices resolve."""
    lo, hi = -(depth + 1), depth
    for k in vision_layers:
        if not lo <= k <= hi:
            raise ValueError(f"vision layer {k} is out of range for an encoder with {depth} layers: "
                             f"use hidden_states indices {lo}..{hi} (0 = embeddings, negative counts from the end)")
    resolved = [k % (depth + 1) for k in vision_layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"vision layers {vision_layers} name the same layer twice on an encoder with {depth} layers")
    return resolved


def _check_literal(name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
