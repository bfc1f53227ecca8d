"""Batch text generation for the batch jobs (captioning, evaluation), through the one decoding engine in process
(as vLLM's offline ``LLM`` runs its engine): one sampler, one stop-string rule, one set of sampling fields.

``Sampling`` holds what ``crosslayer caption`` and ``eval`` accept, as the OpenAI API that ``serve`` offers names
it: ``max_new_tokens``, ``temperature`` (0: greedy, these jobs' default), ``top_p``, ``seed`` and ``stop``
strings; ``params()`` turns it into the engine's ``SamplingParams``. ``complete`` hands every row of a
left-padded batch to the model's in-process ``Engine`` (``pipelines.serve_engine``) as one request, steps it until
every row ended, and returns one ``Completion`` per row: the text ends before the first stop string (which is not
included) or at EOS. ``seed`` seeds every row's own generator: a row samples the same with the same seed, whatever
else is in the batch.
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
    seed: int | None = None  # seeds every row's own sampler; None: not reproducible when temperature > 0
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:  # the engine's range (OpenAI's), as serve accepts it
            raise ValueError(f"temperature ({self.temperature}) must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    def params(self) -> Any:
        """The engine's SamplingParams for these settings (the one sampler of caption, eval and serve)."""
        from .serve_api import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass
class Completion:
    text: str  # decoded, special tokens dropped, stripped, cut before a stop string
    tokens: int  # new tokens generated for this row (its EOS, or the token that completed a stop string, included)
    finish_reason: Literal["stop", "length"]  # stop: EOS or a stop string; length: max_new_tokens reached


def complete(model: Any, inputs: dict[str, Any], visual: Any, sampling: Sampling,
             engine: Any = None) -> list[Completion]:
    """Decode ``inputs`` (from ``FusedVLM.prepare_inputs``) with ``sampling`` in an in-process engine of ``model``
    (``engine``: one from ``offline_engine(model)`` that a caller decoding many batches keeps, so its KV slots are
    reused; None: a fresh one for this call); one Completion per row."""
    from collections import deque

    import torch

    from .serve_api import ChatJob, Delta, End
    from .serve_engine import Prepared, split_rows

    engine = engine if engine is not None else offline_engine(model)
    job = ChatJob(model=OFFLINE, messages=[], images=[], max_tokens=sampling.max_new_tokens, stop=list(sampling.stop),
                  sampling=sampling.params())
    with torch.inference_mode():
        rows = split_rows(inputs, visual)
    items = [Prepared(request_id=str(i), job=job, ids=ids, visual=one) for i, (ids, one) in enumerate(rows)]
    text = [""] * len(items)
    last: list[Delta | None] = [None] * len(items)
    waiting = deque(items)
    try:
        while waiting or engine.rows:
            admit = []  # as the scheduler admits: first come, first served, while rows and KV bytes allow
            while waiting and engine.fits([*admit, waiting[0]]):
                admit.append(waiting.popleft())
            if waiting and not admit and not engine.rows:
                engine.admissible(waiting[0])  # raises: it can never fit
            events = (engine.add(admit) if admit else []) + engine.step()
            for rid, event in events:
                if isinstance(event, End):
                    if event.error is not None:
                        raise RuntimeError(f"generation failed: {event.error.message}")
                else:
                    text[int(rid)] += event.text
                    last[int(rid)] = event
    finally:
        engine.reset()
    return [Completion(text=t.strip(), tokens=d.tokens, finish_reason=d.finish_reason)
            for t, d in zip(text, last)]


OFFLINE = "offline"  # the model id of the batch jobs' in-process engine


def offline_engine(model: Any, max_rows: int = 64) -> Any:
    """An in-process decoding engine over ``model`` for batch work (caption, eval): the caller keeps it beside
    the model and passes it to every ``complete``, so its KV slots are allocated once. No step token budget: batch
    work has no interactive rows to keep responsive, so each prompt is prefilled whole, with the others admitted
    in the same step (one forward), as fast as before chunking."""
    from .serve_engine import Engine

    return Engine({OFFLINE: model}, max_rows=max_rows, max_prompt_tokens=1 << 30, max_step_tokens=1 << 30)


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (each row reproducible, whatever else is in its batch)")
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
