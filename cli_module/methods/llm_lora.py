"""llm_lora: LoRA on the frozen LLM's linear layers (PEFT's ``inject_adapter_in_model``), the baseline every
practitioner asks about: is CLI better than the same number of trainable parameters spent inside the LLM?

  W x  ->  W x + (alpha / r) B A x     at every targeted linear layer of every decoder layer (B zero-initialised,
                                        so the untrained baseline is the base exactly)

The image enters as one-to-one's does (the select layer through P); nothing is injected. The LoRA weights sit
inside the base's decoder, so this method modifies the base it is built on: a fused model with it never shares
its base (``modifies_base``). Its adapter holds them under ``llm_lora.<name in the decoder>``."""

from __future__ import annotations

from .base import Method

PREFIX = "llm_lora."  # adapter tensor names: llm_lora.layers.0.self_attn.q_proj.lora_A.default.weight


class LLMLoRA(Method):
    name = "llm_lora"
    modifies_base = True
    base_deepstack = True  # on Qwen3-VL, LoRA on top of the base as shipped (its DeepStack on), as CLI is

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if config.llm_lora_rank < 1:
            raise ValueError(f"method 'llm_lora' needs llm_lora_rank >= 1, got {config.llm_lora_rank}")
        if not config.llm_lora_targets:
            raise ValueError("method 'llm_lora' needs at least one module name in llm_lora_targets, e.g. q_proj")

    def attach(self, fused) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        c, lm = fused.config, fused.base.language_model
        if any("lora_" in n for n, _ in lm.named_parameters()):
            raise ValueError(f"base {fused.base.name!r} already carries LoRA weights in its LLM (another llm_lora "
                             f"model was built on it); load the base again for a second llm_lora model")
        present = {n.rsplit(".", 1)[-1] for n, _ in lm.layers.named_modules()}
        missing = sorted(set(c.llm_lora_targets) - present)
        if missing:
            raise ValueError(f"llm_lora_targets {missing} name no module of this LLM's decoder layers; "
                             f"its linear layers include {sorted(n for n in present if n.endswith('proj'))}")
        inject_adapter_in_model(LoraConfig(r=c.llm_lora_rank, lora_alpha=c.llm_lora_alpha, lora_dropout=c.dropout,
                                           target_modules=list(c.llm_lora_targets)), lm)

    def mark_trainable(self, fused) -> None:
        for p in self.base_parameters(fused).values():
            p.requires_grad_(True)

    def base_parameters(self, fused) -> dict:
        lm = fused.base.language_model
        return {PREFIX + n: p for n, p in lm.named_parameters() if ".lora_A." in n or ".lora_B." in n}
