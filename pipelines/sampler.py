"""The engine's vectorised sampler: one batch of logits (B, V) -> one token per row, every row's own settings.

Per step, for the whole batch at once (no loop over rows but the seeded rows' noise draws):
  logits, the image placeholder masked                               (B, V)
  -> repetition penalty over prompt + generated tokens (logit / p if positive, else x p)
  -> presence and frequency penalties over the generated tokens (- presence - frequency x count)
  -> logit_bias (dense (B, V), zero for rows without one) and min_tokens (EOS masked)
  -> greedy rows: argmax; sampled rows: / temperature, top_k, softmax, min_p, top_p (one sort shared by top_k
     and top_p), then a draw as vLLM makes it: argmax(p / E) with E ~ Exp(1) per token, which samples p exactly.
A row with a seed draws its noise from its own generator (seed + choice index), V draws per step whatever else is
in the batch, so a seeded choice samples the same tokens alone or in a busy batch; unseeded rows share one draw.

``RowState`` is the per-row part that lives across steps (counts of generated tokens, the prompt's tokens, the
bias row); the engine keeps one per batch, row-aligned with its KV slots, and moves rows with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .serve_api import SamplingParams


@dataclass
class RowState:
    """Row-aligned sampling state of one batch (first dimension: the batch's rows, in slot order)."""

    counts: torch.Tensor  # (B, V) float: occurrences of each token in the row's text so far
    prompt: torch.Tensor  # (B, V) bool: tokens of the row's prompt (repetition_penalty)
    bias: torch.Tensor  # (B, V) float: the row's logit_bias, dense
    generated: torch.Tensor  # (B,) long: tokens generated so far (min_tokens)

    @staticmethod
    def empty(vocab: int, device: torch.device) -> RowState:
        return RowState(counts=torch.zeros(0, vocab, device=device), prompt=torch.zeros(0, vocab, dtype=torch.bool,
                        device=device), bias=torch.zeros(0, vocab, device=device),
                        generated=torch.zeros(0, dtype=torch.long, device=device))

    def append(self, other: RowState) -> RowState:
        return RowState(*(torch.cat([a, b]) for a, b in zip(self.fields(), other.fields())))

    def take(self, index: torch.Tensor) -> RowState:
        return RowState(*(t[index] for t in self.fields()))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.counts, self.prompt, self.bias, self.generated

    @staticmethod
    def new(params: list[SamplingParams], prompts: list[torch.Tensor], vocab: int, device: torch.device) -> RowState:
        """Fresh rows: their prompts' token ids (each (P_i,)) and logit_bias."""
        b = len(params)
        prompt = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        bias = torch.zeros(b, vocab, device=device)
        for i, (p, ids) in enumerate(zip(params, prompts)):
            if p.repetition_penalty != 1.0:
                prompt[i, ids.to(device)] = True
            if p.logit_bias:
                bias[i, torch.tensor(list(p.logit_bias), device=device)] = torch.tensor(
                    list(p.logit_bias.values()), dtype=bias.dtype, device=device)
        return RowState(counts=torch.zeros(b, vocab, device=device), prompt=prompt, bias=bias,
                        generated=torch.zeros(b, dtype=torch.long, device=device))


@dataclass
class BatchParams:
    """The batch's settings as tensors (rebuilt only when the batch's rows change)."""

    temperature: torch.Tensor  # (B,) 1.0 for greedy rows (unused there)
    top_k: torch.Tensor  # (B,) long, V for "all"
    top_p: torch.Tensor  # (B,)
    min_p: torch.Tensor  # (B,)
    repetition: torch.Tensor  # (B,)
    presence: torch.Tensor  # (B,)
    frequency: torch.Tensor  # (B,)
    min_tokens: torch.Tensor  # (B,) long
    greedy: torch.Tensor  # (B,) bool
    generators: list[torch.Generator | None]  # per row: its seeded generator, or None
    any_repetition: bool
    any_penalty: bool
    any_bias: bool
    any_min_tokens: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @staticmethod
    def of(params: list[SamplingParams], generators: list[torch.Generator | None], vocab: int,
           device: torch.device) -> BatchParams:
        def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return BatchParams(
            temperature=t([p.temperature if not p.greedy else 1.0 for p in params]),
            top_k=t([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long),
            top_p=t([p.top_p for p in params]), min_p=t([p.min_p for p in params]),
            repetition=t([p.repetition_penalty for p in params]), presence=t([p.presence_penalty for p in params]),
            frequency=t([p.frequency_penalty for p in params]), min_tokens=t([p.min_tokens for p in params], torch.long),
            greedy=t([p.greedy for p in params], torch.bool), generators=generators,
            any_repetition=any(p.repetition_penalty != 1.0 for p in params),
            any_penalty=any(p.presence_penalty or p.frequency_penalty for p in params),
            any_bias=any(bool(p.logit_bias) for p in params), any_min_tokens=any(p.min_tokens for p in params),
            any_top_k=any(0 < p.top_k < vocab for p in params), any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0 for p in params))


def process_logits(logits: torch.Tensor, p: BatchParams, state: RowState, eos: list[int]) -> torch.Tensor:
    """Penalties, logit_bias and min_tokens on logits (B, V) float -> processed logits (B, V) (a new tensor)."""
    x = logits
    if p.any_repetition:
        seen = state.prompt | (state.counts > 0)  # (B, V)
        r = p.repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if p.any_penalty:
        x = x - (p.frequency[:, None] * state.counts + p.presence[:, None] * (state.counts > 0).to(x.dtype))
    if p.any_bias:
        x = x + state.bias
    if p.any_min_tokens and eos:
        early = state.generated < p.min_tokens  # (B,)
        if bool(early.any()):
            x = x.clone() if x is logits else x
            x[early[:, None] & _eos_mask(x, eos)] = float("-inf")
    return x


def _eos_mask(x: torch.Tensor, eos: list[int]) -> torch.Tensor:
    m = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    m[eos] = True
    return m[None]


def choose(x: torch.Tensor, p: BatchParams) -> torch.Tensor:
    """Processed logits (B, V) -> tokens (B,): argmax for greedy rows, a draw for the others."""
    chosen = x.argmax(dim=-1)
    sampled = ~p.greedy
    if not bool(sampled.any()):
        return chosen
    idx = sampled.nonzero()[:, 0]  # (S,)
    y = x[idx] / p.temperature[idx, None]  # (S, V)
    v = y.shape[-1]
    order = None
    if p.any_top_k or p.any_top_p:
        sorted_y, order = y.sort(dim=-1, descending=True)
        if p.any_top_k:
            kth = sorted_y.gather(1, (p.top_k[idx] - 1).clamp(0, v - 1)[:, None])  # (S, 1)
            y = y.masked_fill(y < kth, float("-inf"))
    probs = torch.softmax(y, dim=-1)
    if p.any_min_p:
        probs = probs.masked_fill(probs < p.min_p[idx, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    if p.any_top_p:
        sorted_p = probs.gather(1, order)  # same order: softmax is monotone, masked tokens are 0 at the end
        keep = (sorted_p.cumsum(-1) - sorted_p < p.top_p[idx, None]) | (p.top_p[idx, None] >= 1.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    noise = torch.empty_like(probs)
    gens = [p.generators[int(i)] for i in idx.tolist()]
    unseeded = [j for j, g in enumerate(gens) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), v, device=probs.device).exponential_()
    for j, g in enumerate(gens):
        if g is not None:  # the row's own stream: V draws per step, whatever else is in the batch
            noise[j] = torch.empty(v, device=probs.device).exponential_(generator=g)
    chosen[idx] = (probs / noise).argmax(dim=-1)
    return chosen
