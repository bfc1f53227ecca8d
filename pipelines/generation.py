"""Batch text generation for the batch jobs (captioning, evaluation): sampling settings and stop strings.

``Sampling`` holds what ``crosslayer caption`` and ``eval`` accept, as the OpenAI API that ``serve`` offers names
it: ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p``, ``seed`` and ``stop`` strings. ``complete`` runs
the fused model's KV-cached decoding (``FusedVLM.stream``) over a left-padded batch and returns one
``Completion`` per row: the text ends before the first stop string (which is not included) or at EOS, and
decoding ends as soon as every row has stopped. ``seed`` seeds one generator per call: the same batch with the
same seed gives the same texts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class Sampling:
    """How each answer or caption is decoded."""

    max_new_tokens: int = 32  # generation budget per row
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sampling from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds the sampler (per model call); None: not reproducible when temperature > 0
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature ({self.temperature}) must be in [0, 10]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    text: str  # decoded, special tokens dropped, stripped, cut before a stop string
    tokens: int  # new tokens generated for this row (its EOS, or the token that completed a stop string, included)
    finish_reason: Literal["stop", "length"]  # stop: EOS or a stop string; length: max_new_tokens reached


def complete(model: Any, inputs: dict[str, Any], visual: Any, sampling: Sampling) -> list[Completion]:
    """Decode ``inputs`` (from ``FusedVLM.prepare_inputs``) with ``sampling``; one Completion per row."""
    tok = model.base.tokenizer
    eos = tok.eos_token_id
    rows = int(inputs["input_ids"].shape[0])
    ids: list[list[int]] = [[] for _ in range(rows)]
    texts: list[str | None] = [None] * rows
    done = [False] * rows
    for step in model.stream(**inputs, visual=visual, max_new_tokens=sampling.max_new_tokens,
                             temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                             eos_token_id=eos):
        for r in range(rows):
            if done[r]:
                continue
            token = int(step.tokens[r])
            ids[r].append(token)
            if token == eos:
                done[r] = True
            elif sampling.stop:
                text = tok.decode(ids[r], skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
                if cut >= 0:
                    texts[r], done[r] = text[:cut], True
        if all(done):
            break
    out = []
    for r in range(rows):
        text = texts[r] if texts[r] is not None else tok.decode(ids[r], skip_special_tokens=True)
        out.append(Completion(text=text.strip(), tokens=len(ids[r]), finish_reason="stop" if done[r] else "length"))
    return out


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible per batch)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string (repeatable)")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, stop=list(args.stop))


class GenerationJob:
    """Mixin of the jobs that generate with an actor pool (caption, eval): their compute and sampling settings,
    read from the dataclass fields of the same names (``device``, ``dtype``, ``concurrency``, ``gpus_per_actor``,
    ``batch_size``; ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``)."""

    def compute_spec(self) -> Any:
        from .compute import ComputeSpec

        return ComputeSpec(device=self.device, dtype=self.dtype, concurrency=self.concurrency,
                           gpus_per_actor=self.gpus_per_actor, batch_size=self.batch_size)

    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                        seed=self.seed, stop=list(self.stop))
