"""Admission by KV memory for the decoding engine (``pipelines.serve_engine``): how many bytes of keys and values
a request reserves, how many the engine may reserve in all, and the error of a request that can never fit.

A request with n choices reserves n x (prompt tokens + max_tokens) x (bytes of one position's keys and values over
every decoder layer) from its admission to its end: the most its rows can ever write. The engine admits it only
when that fits in ``total`` minus what the running and prefilling requests reserved (``reserved``); rows stay capped
by ``max_rows`` too. ``total`` is ``kv_cache_bytes`` when set, else ``max_rows`` x the model's context x the bytes
per position (every row at full length: today's row cap, in bytes), capped on CUDA at 90% of the device memory
free when the engine starts.

What is reserved is what the rows may use, as vLLM counts KV blocks; the storage itself (``pipelines.kv_slots``)
is rectangular per model (slots x the longest reservation, grown by doubling up to max_rows x context), so the
bytes allocated (``Engine.snapshot()["kv_bytes"]``) can exceed the bytes reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cli_module.model import FusedVLM

from .serve_api import ApiError

CUDA_FREE_FRACTION = 0.9  # share of the free device memory the default budget may take on CUDA


def bytes_per_token(model: FusedVLM) -> int:
    """Bytes of one position's keys and values over every decoder layer of ``model``'s base."""
    cfg = model.base.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.base.language_model.parameters()).dtype
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize


@dataclass
class KVBudget:
    """Bytes of KV storage the engine may reserve (``total``) and has reserved (``reserved``)."""

    total: int  # bytes the running and prefilling requests may reserve together
    per_token: dict[str, int]  # model id -> bytes of one position's keys and values
    reserved: int = 0  # bytes reserved by the requests admitted and not ended

    @classmethod
    def of(cls, models: dict[str, FusedVLM], max_rows: int, kv_cache_bytes: int | None,
           device: torch.device) -> KVBudget:
        per_token = {name: bytes_per_token(m) for name, m in models.items()}
        if kv_cache_bytes is not None:
            if kv_cache_bytes <= 0:
                raise ValueError(f"kv_cache_bytes must be > 0 or None (derived), got {kv_cache_bytes}")
            return cls(total=kv_cache_bytes, per_token=per_token)
        context = max(getattr(m.base.text_config, "max_position_embeddings", None) or 0 for m in models.values())
        if not context:
            raise ValueError("the base has no max_position_embeddings to size the KV budget by; set kv_cache_bytes")
        total = max_rows * context * max(per_token.values())
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            total = min(total, int(free * CUDA_FREE_FRACTION))
        return cls(total=total, per_token=per_token)

    def need(self, model_id: str, prompt_tokens: int, max_tokens: int, n: int) -> int:
        """Bytes a request reserves: n x (prompt + max_tokens) positions."""
        return n * (prompt_tokens + max_tokens) * self.per_token[model_id]

    def fits(self, need: int) -> bool:
        return self.reserved + need <= self.total

    def check(self, model_id: str, prompt_tokens: int, max_tokens: int, n: int) -> None:
        """ApiError 400 when the request could not fit even in an idle engine."""
        need = self.need(model_id, prompt_tokens, max_tokens, n)
        if need > self.total:
            per = self.per_token[model_id]
            most = self.total // (n * per) - prompt_tokens
            hint = f"lower max_tokens to {most} or less" if most > 0 else "shorten the prompt"
            raise ApiError(400, f"the request needs {need} bytes of KV cache (n={n} x (prompt {prompt_tokens} + "
                                f"max_tokens {max_tokens}) tokens x {per} bytes per token), over this replica's "
                                f"KV budget of {self.total} bytes (kv_cache_bytes); {hint}, or raise kv_cache_bytes",
                           param="max_tokens", code="kv_cache_exceeded")
