"""The rows of one model in the decoding engine (``pipelines.serve_engine``) and where they live in its KV slots.

A model's ``Batch`` holds two kinds of rows, in one slot layout::

    slots  [0, D)            decoding rows: one token per engine step; row-aligned tensors (next tokens, sampling
                             state) index them 0..D-1
           [D, D + Σ n_i)    requests being prefilled, in admission order (``Prefill``): request i's n_i choices
                             sit in n_i consecutive slots, each holding the prompt's first ``done`` positions

A request's prompt is written chunk by chunk into all of its n slots (identical copies, so each choice later
decodes in its own slot); the first slot is the one its chunks read. Chunks are given in admission order (the
engine's budget goes to the oldest request first), so the requests that finish their prompt in a step are always
the first ones of the prefilling block: they become decoding rows D.. without moving a byte. A departing
decoding row's slot is filled by moving the last decoding row into it (one copy per departure, not per token), and
the prefilling block then moves down to close the gap (its slots hold partial prompts: one copy of ``done``
positions per slot, only while something is being prefilled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cli_module.model import FusedVLM

from .detokenize import IncrementalText
from .kv_slots import ImageSlots, KVSlots
from .sampler import BatchParams, RowState
from .serve_api import ChatJob, SamplingParams


@dataclass
class Row:
    """One choice being decoded: what it generated and sent so far."""

    request_id: str  # the request it belongs to
    index: int  # its choice index
    job: ChatJob  # the request's settings
    generator: torch.Generator | None  # its own sampling generator (seeded: seed + index), None otherwise
    text: IncrementalText  # its answer's text, incrementally decoded
    tokens: int = 0  # tokens generated (EOS included)
    pieces: list[str] = field(default_factory=list)  # each generated token decoded alone (gate heatmap labels)
    gates: list[Any] = field(default_factory=list)  # per generated token, (|T|, K) numpy, when return_gates
    finish: str | None = None  # "stop" or "length" once done
    cancelled: bool = False  # its client went away
    image_slot: int = -1  # its image's AGF keys/values slot (-1: none read at decode steps)
    rope_delta: int = 0  # a Qwen base's M-RoPE offset of its positions after its image (cli_module.qwen)

    @property
    def params(self) -> SamplingParams:
        return self.job.sampling


@dataclass
class Prefill:
    """A request admitted to a batch whose prompt is not fully written into its slots yet."""

    item: Any  # the engine's Prepared request (ids (1, S), visual state)
    rows: list[Row]  # its n choices, in slot order
    seq: int  # admission order over the whole engine: the step budget goes to the lowest first
    done: int = 0  # prompt positions already in its slots
    image_slot: int = -1  # its image's AGF keys/values slot (CLI), shared by its n rows; -1: none
    image_before: list[int] | None = None  # [s] = image tokens among the first s prompt tokens (S + 1 entries)
    rope_positions: torch.Tensor | None = None  # (3, S) a Qwen image prompt's M-RoPE positions (cli_module.qwen)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def left(self) -> int:
        return self.item.prompt_tokens - self.done


class Batch:
    """The rows of one model: decoding rows in slots 0..D-1, then the requests being prefilled (module docstring)."""

    def __init__(self, model: FusedVLM, vocab: int, device: torch.device, max_rows: int):
        cfg = model.base.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.base.language_model.parameters()).dtype
        self.model = model
        self.kv = KVSlots(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype, device,
                          max_length=getattr(cfg, "max_position_embeddings", None), max_rows=max_rows)
        self.images = ImageSlots()
        self.rows: list[Row] = []  # decoding rows, row i in slot i
        self.lengths: list[int] = []  # tokens in each decoding row's slot
        self.prefilling: list[Prefill] = []  # admitted, prompt not fully written; slots after the decoding rows
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=device)  # (D,) the next step's inputs
        self.state = RowState.empty(vocab, device)  # (D, ...) sampling state
        self.params: BatchParams | None = None  # the decoding rows' settings as tensors
        self.vocab, self.device = vocab, device

    @property
    def slots_used(self) -> int:
        """Slots holding a row: decoding rows plus the prefilling requests' choices."""
        return len(self.rows) + sum(p.n for p in self.prefilling)

    def first_slot(self, index: int) -> int:
        """The first slot of ``self.prefilling[index]``."""
        return len(self.rows) + sum(p.n for p in self.prefilling[:index])

    def refresh(self) -> None:
        self.params = BatchParams.of([r.params for r in self.rows], [r.generator for r in self.rows], self.vocab,
                                     self.device) if self.rows else None

    def clear(self) -> None:
        """Forget every row, decoding or prefilling (their image slots freed)."""
        for row in [*self.rows, *(r for p in self.prefilling for r in p.rows)]:
            if row.image_slot >= 0:
                self.images.release(row.image_slot)
        self.rows, self.lengths, self.prefilling, self.params = [], [], [], None
        self.next_tokens = self.next_tokens[:0]
        self.state = RowState.empty(self.vocab, self.device)

    def promote(self, count: int, first_tokens: torch.Tensor, state: RowState) -> None:
        """The first ``count`` prefilling requests wrote their whole prompt: their rows (already in the slots right
        after the decoding rows) decode from now on, starting from ``first_tokens`` (R,) with sampling ``state``."""
        done, self.prefilling = self.prefilling[:count], self.prefilling[count:]
        for p in done:
            self.rows += p.rows
            self.lengths += [p.item.prompt_tokens] * p.n
        self.next_tokens = torch.cat([self.next_tokens, first_tokens])
        self.state = self.state.append(state)
        self.refresh()

    def retire(self) -> None:
        """Drop finished and cancelled rows (and prefilling requests whose rows were cancelled): the last decoding
        rows move into the freed slots, then the prefilling block moves down behind them."""
        gone = [p for p in self.prefilling if any(r.cancelled for r in p.rows)]
        keep = [i for i, r in enumerate(self.rows) if r.finish is None and not r.cancelled]
        if len(keep) == len(self.rows) and not gone:
            return
        for row in [*self.rows, *(r for p in gone for r in p.rows)]:
            if (row.finish is not None or row.cancelled) and row.image_slot >= 0:
                self.images.release(row.image_slot)
        n = len(keep)
        kept = set(keep)
        holes = [j for j in range(n) if j not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            self.kv.move(mover, hole, self.lengths[mover])
            order[hole] = mover
        src, dst = len(self.rows), n  # the prefilling block, in order: each slot moves down (dst <= src)
        staying = []
        for p in self.prefilling:
            if p in gone:
                src += p.n
                continue
            for _ in range(p.n):
                if src != dst and p.done:
                    self.kv.move(src, dst, p.done)
                src, dst = src + 1, dst + 1
            staying.append(p)
        self.prefilling = staying
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.next_tokens = self.next_tokens[index]
        self.state = self.state.take(index)
        self.refresh()
