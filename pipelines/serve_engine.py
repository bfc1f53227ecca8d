"""The decoding engine: continuous batching of chat requests over FusedVLMs that share one base, in plain PyTorch
(no Ray: ``pipelines.serve_scheduler`` drives it from asyncio, ``pipelines.serve_model`` puts it in Serve), in
the layers vLLM uses:

  input processor (any thread)  ``prepare``: chat template, prompt limits, tokeniser, image -> encoder ->
                                projector, AMP tokens and AGF keys/values (``FusedVLM.prepare_inputs``)
  runner (engine thread)        per model, one batch whose row i lives in KV slot i of preallocated per-row
                                storage (``pipelines.kv_slots``): ``add`` prefills new requests (one left-padded
                                forward per (model, has image)) writing their prompts' keys/values straight into
                                fresh slots (n choices: n slots, one image slot); ``step`` runs one forward per
                                model over all its rows, each writing one position and reading its slot as a view
                                through a 4-D mask (rows of different lengths, no padding, no concatenation)
  sampler                       ``pipelines.sampler``: penalties, logit_bias, min_tokens, temperature, top-k/p,
                                min-p and per-row seeded draws for the whole batch at once
  detokeniser                   ``pipelines.detokenize``: incremental, stop strings held back
  cancel (engine thread)        the rows of cancelled requests leave before the next step

Rows with an image read AGF's keys/values from their image's slot at each step (a CLI adapter's rows; text-only
rows of the same model pass through AGF unchanged). Positions count each row's real tokens only and a row's
attention sees exactly its own prompt and answer, so each row computes what it would alone: greedy answers equal
sequential ones. Log-probabilities are the model's (log-softmax of the raw logits), as vLLM reports them.

Threads: ``prepare`` may run on another thread than ``add``/``step``/``cancel``, which must share one (decoder
forwards of adapters over one base must not interleave); the engine detokenises with its own copy of the
tokenizer, so the two threads never use one tokenizer at once.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cli_module.model import FusedVLM, VisualState
from cli_module.prompting import render

from .detokenize import IncrementalText
from .kv_slots import ImageSlots, KVSlots, SlotCache
from .sampler import BatchParams, RowState, choose, process_logits
from .serve_api import IMAGE, ApiError, ChatJob, Delta, End, Event, SamplingParams

logger = logging.getLogger("ray.serve")
MIN_LOGPROB = -9999.0  # JSON has no -Infinity: reported log-probabilities are clamped here (as vLLM does)


@dataclass
class Prepared:
    """A request ready to decode (``Engine.prepare``): prompt tokenised, image encoded."""

    request_id: str  # key of the request's events
    job: ChatJob  # the validated request (its images dropped once encoded)
    ids: torch.Tensor  # (1, S) prompt token ids, the <image> placeholder expanded to the image's token count
    visual: VisualState | None  # the image's input embeddings, AMP tokens and AGF keys/values (batch of 1)

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]


@dataclass
class _Row:
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


class _Batch:
    """The rows of one model, decoding together: row i lives in KV slot i; its tensors are row-aligned."""

    def __init__(self, model: FusedVLM, vocab: int, device: torch.device, max_rows: int):
        cfg = model.base.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.base.language_model.parameters()).dtype
        self.model = model
        self.kv = KVSlots(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype, device,
                          max_length=getattr(cfg, "max_position_embeddings", None), max_rows=max_rows)
        self.images = ImageSlots()
        self.rows: list[_Row] = []
        self.lengths: list[int] = []  # tokens in each row's slot
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=device)  # (B,) the next step's inputs
        self.state = RowState.empty(vocab, device)  # (B, ...) sampling state
        self.params: BatchParams | None = None  # the rows' settings as tensors
        self.vocab, self.device = vocab, device

    def refresh(self) -> None:
        self.params = BatchParams.of([r.params for r in self.rows], [r.generator for r in self.rows], self.vocab,
                                     self.device) if self.rows else None

    def clear(self) -> None:
        for row in self.rows:
            if row.image_slot >= 0:
                self.images.release(row.image_slot)
        self.rows, self.lengths, self.params = [], [], None
        self.next_tokens = self.next_tokens[:0]
        self.state = RowState.empty(self.vocab, self.device)

    def retire(self) -> None:
        """Drop finished and cancelled rows; the last rows move into the freed slots (rows stay 0..B-1)."""
        keep = [i for i, r in enumerate(self.rows) if r.finish is None and not r.cancelled]
        if len(keep) == len(self.rows):
            return
        for row in self.rows:
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
        self.rows = [self.rows[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.next_tokens = self.next_tokens[index]
        self.state = self.state.take(index)
        self.refresh()


class Engine:
    """Continuous batching over ``models`` (id -> FusedVLM in eval mode, all over one base, on one device)."""

    def __init__(self, models: dict[str, FusedVLM], max_rows: int, max_prompt_tokens: int):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.models, self.max_rows, self.max_prompt_tokens = models, max_rows, max_prompt_tokens
        first = next(iter(models.values()))
        self.device = first.base.lm_head.weight.device
        self.detok = copy.deepcopy(first.base.tokenizer)  # the engine thread's own tokenizer
        self.eos = {self.detok.eos_token_id} if self.detok.eos_token_id is not None else set()
        self.eos_list = sorted(self.eos)
        self.image_token_id = first.base.image_token_id
        self.vocab = first.base.lm_head.weight.shape[0]
        self.byte_level = type(getattr(self.detok.backend_tokenizer, "decoder", None)).__name__ == "ByteLevel"
        for model in models.values():
            kinds = {type(layer).__name__ for layer in DynamicCache(config=model.base.text_config).layers}
            if kinds != {DynamicLayer.__name__}:
                raise ValueError(f"continuous batching needs full-attention KV cache layers; this base's cache has "
                                 f"{sorted(kinds)}")
        self.batches: dict[str, _Batch] = {}  # model id -> its rows (storage kept, reused, between requests)
        self.choices: dict[str, int] = {}  # request id -> its choices still decoding
        self.pieces: dict[int, str] = {}  # token id -> its text alone (log-probability labels)
        self.generated: Counter[str] = Counter()  # model id -> tokens generated
        self.prompt_tokens: Counter[str] = Counter()  # model id -> prompt tokens prefilled
        self.batch_sizes: Counter[int] = Counter()  # rows in a batch's decode step -> steps
        self.cancelled_rows = 0  # rows dropped because their request was cancelled

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        return sum(len(b.rows) for b in list(self.batches.values()))

    def snapshot(self) -> dict[str, Any]:
        """Counters for metrics, safe to read from another thread while the engine runs (copies under the GIL)."""
        return {"running_rows": self.rows, "batch_sizes": dict(self.batch_sizes), "generated": dict(self.generated),
                "prompt_tokens": dict(self.prompt_tokens), "cancelled_rows": self.cancelled_rows,
                "kv_bytes": sum(b.kv.nbytes() for b in list(self.batches.values()))}

    @property
    def free_rows(self) -> int:
        return self.max_rows - self.rows

    # --- prepare (any thread) ---------------------------------------------------------------------------------

    def prepare(self, job: ChatJob, request_id: str) -> Prepared:
        """Chat template, prompt limits, tokeniser and image encoding of one request (no decoder forward)."""
        (result,) = self.prepare_many([(job, request_id)])
        if isinstance(result, Exception):
            raise result
        return result

    def prepare_many(self, jobs: list[tuple[ChatJob, str]]) -> list[Prepared | Exception]:
        """``prepare`` for requests that arrived together: the images of one model are encoded in one batch (a
        burst of requests then also prefills as one batch). Each result is the request's Prepared, or the error
        it gets; a batch that fails is retried request by request, so one bad request fails alone."""
        out: list[Prepared | Exception | None] = [None] * len(jobs)
        groups: dict[tuple[str, bool], list[tuple[int, str]]] = {}
        for i, (job, _) in enumerate(jobs):
            try:
                groups.setdefault((job.model, bool(job.images)), []).append((i, self._prompt(job)))
            except Exception as err:  # noqa: BLE001 (the caller turns it into the request's answer)
                out[i] = err
        for (model_id, _), members in groups.items():
            try:
                self._finish(jobs, model_id, members, out)
            except Exception as err:  # noqa: BLE001
                if len(members) == 1:
                    out[members[0][0]] = err
                    continue
                for member in members:  # find the request that fails: the others still go through
                    try:
                        self._finish(jobs, model_id, [member], out)
                    except Exception as alone:  # noqa: BLE001
                        out[member[0]] = alone
        return out

    def _prompt(self, job: ChatJob) -> str:
        """Checks that need no tokens, the chat template, and the prompt's text token count -> the prompt."""
        if job.model not in self.models:
            raise ApiError(404, f"model {job.model!r} is not served by this replica", param="model",
                           code="model_not_found")
        if job.n > self.max_rows:
            raise ApiError(400, f"n={job.n} exceeds this replica's rows ({self.max_rows})", param="n")
        model = self.models[job.model]
        tok = model.base.tokenizer
        if job.return_gates and (model.config.method != "cli" or not job.images):
            raise ApiError(400, f"return_gates needs a CLI adapter (model {job.model!r} is method "
                                f"{model.config.method!r}) and an image in the request", param="return_gates")
        bad = sorted(t for t in job.sampling.logit_bias if not 0 <= t < self.vocab)
        if bad:
            raise ApiError(400, f"logit_bias names token ids {bad[:5]} outside this model's vocabulary of "
                                f"{self.vocab}", param="logit_bias", code="invalid_value")
        token = tok.convert_ids_to_tokens(model.base.image_token_id)
        messages = [{**m, "content": m["content"].replace(IMAGE, token)} for m in job.messages]
        if "system" not in (getattr(tok, "chat_template", None) or ""):  # template without a system role
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            messages = [m for m in messages if m["role"] != "system"]
            if system and messages:
                messages[0] = {**messages[0], "content": f"{system}\n\n{messages[0]['content']}"}
        try:
            prompt = render(tok, messages, add_generation_prompt=True, image_token=token)
        except Exception as err:
            if type(err).__module__.startswith("jinja2"):  # the template refuses these messages (e.g. roles)
                raise ApiError(400, f"the model's chat template refused the messages: {err}",
                               param="messages") from None
            raise
        text_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if text_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"prompt has {text_tokens} tokens, over max_prompt_tokens={self.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        return prompt

    def _finish(self, jobs: list[tuple[ChatJob, str]], model_id: str, members: list[tuple[int, str]],
                out: list[Prepared | Exception | None]) -> None:
        """Encode the members' prompts and images as one batch; their Prepared (or limit errors) go to ``out``."""
        encoded = self._encode(model_id, [(jobs[i][0], prompt) for i, prompt in members])
        for (i, _), (ids, visual) in zip(members, encoded):
            job, request_id = jobs[i]
            try:
                out[i] = self._checked(job, request_id, ids, visual)
            except ApiError as err:
                out[i] = err

    def _encode(self, model_id: str, items: list[tuple[ChatJob, str]]) -> list[tuple[torch.Tensor, Any]]:
        """Prompts (all with an image, or none) -> each one's ids (1, S_i) and VisualState (batch of 1)."""
        model = self.models[model_id]
        images = [job.images[0] for job, _ in items] if items[0][0].images else None
        with torch.inference_mode():
            enc, visual = model.prepare_inputs([prompt for _, prompt in items], images)
        return split_rows(enc, visual)

    def _checked(self, job: ChatJob, request_id: str, ids: torch.Tensor, visual: Any) -> Prepared:
        n, limit = ids.shape[1], self.max_prompt_tokens
        if n > limit:
            raise ApiError(400, f"prompt has {n} tokens with the image's, over max_prompt_tokens={limit}",
                           param="messages", code="context_length_exceeded")
        context = getattr(self.models[job.model].base.text_config, "max_position_embeddings", None)
        if context and n + job.max_tokens > context:
            raise ApiError(400, f"prompt ({n} tokens) + max_tokens ({job.max_tokens}) exceeds the model's context of "
                                f"{context} tokens", param="max_tokens", code="context_length_exceeded")
        return Prepared(request_id=request_id, job=replace(job, images=[]), ids=ids, visual=visual)

    # --- engine thread -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, items: list[Prepared]) -> list[tuple[str, Event]]:
        """Prefill new requests; each emits its first token and its rows join their model's batch."""
        if sum(i.job.n for i in items) > self.free_rows:
            raise ValueError(f"{sum(i.job.n for i in items)} new rows do not fit in {self.free_rows} free rows")
        groups: dict[tuple[str, bool], list[Prepared]] = {}
        for item in items:
            groups.setdefault((item.job.model, item.visual is not None), []).append(item)
        events: list[tuple[str, Event]] = []
        for (model_id, has_image), group in groups.items():
            try:
                events += self._prefill(model_id, has_image, group)
            except Exception as err:  # one failed prefill ends its own requests only
                logger.exception("crosslayer: prefill failed")
                for item in group:
                    self.choices.pop(item.request_id, None)
                    events.append((item.request_id, End(error=ApiError.internal(err, during="prefilling"))))
        return events

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Event]]:
        """One decode step of every model's batch: one new token per row; finished rows leave."""
        events: list[tuple[str, Event]] = []
        for model_id, batch in list(self.batches.items()):
            if not batch.rows:
                continue
            try:
                events += self._decode(model_id, batch)
            except Exception as err:  # a failing batch ends its own requests; the others go on
                logger.exception("crosslayer: decode step failed")
                for rid in dict.fromkeys(r.request_id for r in batch.rows):
                    if self.choices.pop(rid, None) is not None:
                        events.append((rid, End(error=ApiError.internal(err, during="generating"))))
                batch.clear()
        return events

    @torch.inference_mode()
    def cancel(self, request_ids: set[str]) -> None:
        """Drop the rows of these requests (their clients went away); they send nothing more."""
        if not request_ids:
            return
        for rid in request_ids:
            self.choices.pop(rid, None)
        for batch in self.batches.values():
            for row in batch.rows:
                if row.request_id in request_ids:
                    row.cancelled = True
                    self.cancelled_rows += 1
            batch.retire()

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget every row (after a failure the scheduler could not attribute)."""
        for batch in self.batches.values():
            batch.clear()
        self.choices.clear()

    # --- internals ------------------------------------------------------------------------------------------

    def _batch(self, model_id: str) -> _Batch:
        if model_id not in self.batches:
            self.batches[model_id] = _Batch(self.models[model_id], self.vocab, self.device, self.max_rows)
        return self.batches[model_id]

    def _prefill(self, model_id: str, has_image: bool, items: list[Prepared]) -> list[tuple[str, Event]]:
        model, batch = self.models[model_id], self._batch(model_id)
        pad = model.base.tokenizer.pad_token_id or 0
        lengths = [item.prompt_tokens for item in items]
        width = max(lengths)
        ids = torch.full((len(items), width), pad, dtype=torch.long, device=self.device)  # (P, S) left-padded
        mask = torch.zeros_like(ids)
        for b, item in enumerate(items):
            ids[b, width - item.prompt_tokens:] = item.ids[0]
            mask[b, width - item.prompt_tokens:] = 1
        first = len(batch.rows)  # the new rows' slots: first, first + 1, ...
        rows = [self._new_row(item, i) for item in items for i in range(item.job.n)]
        src = torch.tensor([b for b, item in enumerate(items) for _ in range(item.job.n)], device=self.device)
        need = max(item.prompt_tokens + item.job.max_tokens for item in items)
        batch.kv.reserve(first + len(rows), need, used=first, used_length=max(batch.lengths, default=0))
        # one write per (slot, prompt token): slot first + r gets prompt src[r]'s tokens at positions 0..len-1
        slot, prompt, seq, pos = [], [], [], []
        for r, b in enumerate(src.tolist()):
            n = lengths[b]
            slot.append(torch.full((n,), first + r))
            prompt.append(torch.full((n,), b))
            seq.append(torch.arange(width - n, width))
            pos.append(torch.arange(n))
        cache = SlotCache(batch.kv, "prefill", pos=torch.cat(pos).to(self.device),
                          rows=torch.cat(slot).to(self.device), src=torch.cat(prompt).to(self.device),
                          seq=torch.cat(seq).to(self.device))
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)  # padding queries see themselves (no NaN)
        mask4 = (causal[None] & mask.bool()[:, None, :]) | eye[None]  # (P, S, S)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (P, S) real tokens only
        visual = merge_visual([item.visual for item in items]) if has_image else None
        if has_image and model.base.qwen:  # M-RoPE: the model's own positions for the images and the text after
            from cli_module.qwen import rope_index

            positions, _ = rope_index(model.base, ids, ids == model.base.image_token_id, visual.grids, mask)
            for row, b in zip(rows, src.tolist()):
                row.rope_delta = int(items[b].visual.rope_deltas[0])
        gates_wanted = any(r.job.return_gates for r in rows)
        out = model(ids, mask4[:, None], position_ids=positions, visual=visual, cache=cache, use_cache=True,
                    return_gates=gates_wanted, logits_to_keep=1)
        gates = out.gates[:, -1][src] if out.gates is not None else None  # (R, |T|, K)
        if has_image and model.config.method == "cli":  # one AGF slot per image, shared by its n rows
            image_slot = [batch.images.add(item.visual.kv, item.job.n) for item in items]
            for row, b in zip(rows, src.tolist()):
                row.image_slot = image_slot[b]
        for item in items:
            self.choices[item.request_id] = item.job.n
            self.prompt_tokens[model_id] += item.prompt_tokens
        params = BatchParams.of([r.params for r in rows], [r.generator for r in rows], self.vocab, self.device)
        state = RowState.new([r.params for r in rows], [items[b].ids[0] for b in src.tolist()], self.vocab,
                             self.device)
        tokens, events = self._choose(model_id, rows, out.logits[:, -1].float()[src], params, state, gates)
        batch.rows += rows
        batch.lengths += [lengths[b] for b in src.tolist()]
        batch.next_tokens = torch.cat([batch.next_tokens, tokens])
        batch.state = batch.state.append(state)
        batch.refresh()
        batch.retire()
        return events

    def _decode(self, model_id: str, batch: _Batch) -> list[tuple[str, Event]]:
        b = len(batch.rows)
        pos = torch.tensor(batch.lengths, dtype=torch.long, device=self.device)  # (B,) each row's write position
        read = max(batch.lengths) + 1
        mask = torch.arange(read, device=self.device)[None] <= pos[:, None]  # (B, read): its own positions
        visual = None
        slots = [r.image_slot for r in batch.rows]
        if batch.model.config.method == "cli" and max(slots) >= 0:
            has = torch.tensor([s >= 0 for s in slots], device=self.device)
            reading = torch.tensor([s for s in slots if s >= 0], device=self.device)
            visual = VisualState(image_embeds=None, tokens=None, kv=batch.images.gather(reading), counts=[],
                                 rows=None if bool(has.all()) else has, token_mask=batch.images.mask(reading))
        gates_wanted = any(r.job.return_gates for r in batch.rows)
        cache = SlotCache(batch.kv, "decode", pos=pos, rows=b, read=read)
        position_ids = pos[:, None]  # (B, 1)
        if batch.model.base.qwen:  # M-RoPE: the text position plus the row's image offset, on all three axes
            delta = torch.tensor([r.rope_delta for r in batch.rows], dtype=torch.long, device=self.device)
            position_ids = (pos + delta)[None, :, None].expand(3, b, 1)
        out = batch.model(batch.next_tokens[:, None], mask[:, None, None], position_ids=position_ids, visual=visual,
                          cache=cache, use_cache=True, return_gates=gates_wanted, logits_to_keep=1)
        batch.lengths = [n + 1 for n in batch.lengths]
        gates = out.gates[:, -1] if out.gates is not None else None  # (B, |T|, K)
        batch.next_tokens, events = self._choose(model_id, batch.rows, out.logits[:, -1].float(), batch.params,
                                                 batch.state, gates)
        self.batch_sizes[b] += 1
        batch.retire()
        return events

    def _new_row(self, item: Prepared, index: int) -> _Row:
        p = item.job.sampling
        generator = None
        if not p.greedy and p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed + index)
        return _Row(request_id=item.request_id, index=index, job=item.job, generator=generator,
                    text=IncrementalText(self.detok, item.job.stop))

    def _choose(self, model_id: str, rows: list[_Row], logits: torch.Tensor, params: BatchParams, state: RowState,
                gates: torch.Tensor | None) -> tuple[torch.Tensor, list[tuple[str, Event]]]:
        """logits (R, V) float -> each row's token (R,) and its events (a Delta; an End after a request's last);
        ``state`` (row-aligned with ``rows``) is updated in place."""
        logits[:, self.image_token_id] = float("-inf")  # a placeholder is never an answer
        logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in rows) else None
        chosen = choose(process_logits(logits, params, state, self.eos_list), params)  # (R,)
        tokens = chosen.tolist()
        state.generated += 1
        text = [i for i, t in enumerate(tokens) if t not in self.eos]
        if text:
            index = torch.tensor(text, device=self.device)
            state.counts[index, chosen[index]] += 1
        gate_rows = gates.float().cpu().numpy() if gates is not None else None
        events: list[tuple[str, Event]] = []
        for b, (row, token) in enumerate(zip(rows, tokens)):
            entry = None
            if logprobs is not None and row.params.logprobs and token not in self.eos:
                entry = [self._logprob_entry(logprobs[b], token, row.params.top_logprobs)]
            events.append((row.request_id, self._advance(row, token, entry,
                                                         None if gate_rows is None else gate_rows[b], len(rows))))
            if row.finish is not None:
                left = self.choices.get(row.request_id, 0) - 1
                if left > 0:
                    self.choices[row.request_id] = left
                elif self.choices.pop(row.request_id, None) is not None:
                    events.append((row.request_id, End()))
        self.generated[model_id] += len(rows)
        return chosen, events

    def _advance(self, row: _Row, token: int, entries: list[dict[str, Any]] | None, gates: Any, rows: int) -> Delta:
        job = row.job
        row.tokens += 1
        if job.return_gates:
            row.pieces.append(self._piece(token))
            if gates is not None:
                row.gates.append(gates)
        if token in self.eos:
            row.finish = "stop"
            row.text.flush()
        else:
            row.text.push(token)
            if row.text.stopped:
                row.finish = "stop"
            elif row.tokens >= job.max_tokens:
                row.text.flush()
                row.finish = "stop" if row.text.stopped else "length"
        delta = row.text.delta(finished=row.finish is not None)
        summary = gate_summary(row, row.job, self.models[job.model].config) \
            if row.finish is not None and job.return_gates else None
        return Delta(index=row.index, text=delta, tokens=row.tokens, logprobs=entries,
                     finish_reason=row.finish, gates=summary, rows=rows, time=time.monotonic())

    def _piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.detok.decode([token])
        return self.pieces[token]

    def _token_bytes(self, token: int) -> list[int]:
        """The token's bytes: byte-level BPE symbols mapped back, SentencePiece byte tokens, else its UTF-8 text."""
        raw = self.detok.convert_ids_to_tokens(token) or ""
        if self.byte_level and all(c in BYTE_DECODER for c in raw):
            return [BYTE_DECODER[c] for c in raw]
        found = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)
        if found:
            return [int(found.group(1), 16)]
        return list(self._piece(token).encode("utf-8"))

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, top: int) -> dict[str, Any]:
        """OpenAI's logprobs.content entry for ``token`` from log-probabilities (V,)."""

        def one(t: int, value: float) -> dict[str, Any]:
            return {"token": self._piece(t), "logprob": max(value, MIN_LOGPROB), "bytes": self._token_bytes(t)}

        entry = one(token, float(logprobs[token]))
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
        entry["top_logprobs"] = [one(t, v) for t, v in zip(ids.tolist(), values.tolist())]
        return entry



def split_rows(enc: dict[str, torch.Tensor], visual: VisualState | None) -> list[tuple[torch.Tensor, Any]]:
    """A left-padded batch (``FusedVLM.prepare_inputs``) -> each row's prompt ids (1, S_i) and VisualState (batch of
    1, or None): what ``Prepared`` holds."""
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    out, start = [], 0
    for b, n in enumerate(lengths):
        one = None
        if visual is not None:  # row b's share: its image tokens, AMP tokens and AGF keys/values
            count = visual.counts[b]
            real = slice(None)  # a Qwen row's own tokens, without the batch's padding
            if visual.token_mask is not None:
                real = slice(0, int(visual.token_mask[b].sum()))
            one = replace(visual, counts=[count],
                          image_embeds=None if visual.image_embeds is None else
                          visual.image_embeds[start:start + count],
                          tokens=None if visual.tokens is None else visual.tokens[b:b + 1, :, real],
                          kv=[(k[b:b + 1, :, :, real], v[b:b + 1, :, :, real]) for k, v in visual.kv],
                          token_mask=None,
                          grids=None if visual.grids is None else visual.grids[b:b + 1],
                          rope_deltas=None if visual.rope_deltas is None else visual.rope_deltas[b:b + 1],
                          deepstack_embeds=None if visual.deepstack_embeds is None else
                          [d[start:start + count] for d in visual.deepstack_embeds])
            start += count
        out.append((enc["input_ids"][b:b + 1, -int(n):], one))  # left-padded: the last n are the prompt
    return out


def merge_visual(states: list[VisualState]) -> VisualState:
    """Concatenate per-request VisualStates along the batch (the order of the rows and their image tokens)."""
    if len(states) == 1:
        return states[0]

    def cat(tensors: list[Any]) -> Any:
        return None if tensors[0] is None else torch.cat(tensors)

    # a Qwen base's images have different token counts: AMP tokens (B, K, N, D) and AGF keys/values
    # (B, H, K, N, dh) are padded along N to the longest, and the real ones marked (token_mask)
    lengths = [s.tokens.shape[2] if s.tokens is not None else s.kv[0][0].shape[3] if s.kv else 0 for s in states]
    width = max(lengths)

    def padded(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, width - t.shape[dim]])

    kv = [(torch.cat([padded(s.kv[i][0], 3) for s in states]), torch.cat([padded(s.kv[i][1], 3) for s in states]))
          for i in range(len(states[0].kv))]
    tokens = None if states[0].tokens is None else torch.cat([padded(s.tokens, 2) for s in states])
    token_mask = None
    if len(set(lengths)) > 1:
        token_mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]  # (B, N)
    deepstack = None
    if states[0].deepstack_embeds is not None:
        deepstack = [torch.cat([s.deepstack_embeds[j] for s in states]) for j in range(len(states[0].deepstack_embeds))]
    return VisualState(image_embeds=cat([s.image_embeds for s in states]), tokens=tokens, kv=kv,
                       counts=[c for s in states for c in s.counts], grids=cat([s.grids for s in states]),
                       rope_deltas=cat([s.rope_deltas for s in states]), token_mask=token_mask,
                       deepstack_embeds=deepstack)


def gate_summary(row: _Row, job: ChatJob, config: Any) -> dict[str, Any]:
    """(T, |T|, K) gates of one answer with their layer indices and token labels, as JSON-ready lists."""
    values = np.stack(row.gates) if row.gates else np.zeros((0, len(config.inject_layers), len(config.vision_layers)))
    return {"shape": list(values.shape), "inject_layers": list(config.inject_layers),
            "vision_layers": list(config.vision_layers), "tokens": row.pieces,
            "values": np.round(values.astype(float), 5).tolist()}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: symbol -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


BYTE_DECODER = _byte_decoder()  # constant after import
