"""The decoding engine: continuous batching of chat requests over FusedVLMs that share one base, in plain PyTorch
(no Ray: ``pipelines.serve_scheduler`` drives it from asyncio, ``pipelines.serve_model`` puts it in Serve), in
the layers vLLM uses:

  input processor (any thread)  ``prepare``: chat template, prompt limits, tokeniser, image -> encoder ->
                                projector, AMP tokens and AGF keys/values (``FusedVLM.prepare_inputs``)
  scheduler (engine thread)     ``fits``/``add`` admit a request when its n rows fit in ``max_rows`` and its KV
                                reservation, n x (prompt + max_tokens) positions, in the bytes the running requests
                                left of the KV budget (``pipelines.kv_budget``; ``prepare`` refuses one that could
                                never fit); ``step`` spends a budget of ``max_step_tokens`` tokens: one per decoding
                                row, the rest on prompt chunks of the admitted requests, oldest first, so a prompt
                                longer than what is left is prefilled over several steps while every running row
                                still gets its token at each of them
  runner (engine thread)        per model, one batch whose rows live in KV slots of preallocated per-row storage
                                (``pipelines.kv_slots``; the slot layout in ``pipelines.serve_batch``): a chunk
                                forward writes each prompt chunk's keys/values at positions [p, p + c) straight into
                                its request's slots (n choices: n slots, one image slot) and attends to the slot's
                                earlier positions plus itself, causally; a decode forward writes one position per
                                row and reads its slot as a view through a 4-D mask (rows of different lengths, no
                                padding, no concatenation); a request emits its first token after its last chunk
  sampler                       ``pipelines.sampler``: penalties, logit_bias, min_tokens, temperature, top-k/p,
                                min-p and per-row seeded draws for the whole batch at once
  detokeniser                   ``pipelines.detokenize``: incremental, stop strings held back
  cancel (engine thread)        the rows of cancelled requests leave before the next step

Decode rows and prompt chunks run as two forwards within one step (per model), not one: a decode row reads its
slot as a view with a one-query mask, and folding it into the chunks' forward would pad it to the chunk's width
(c times the decode work) or need a ragged-attention kernel (vLLM's flash-attention varlen), which SDPA with dense
masks does not have; two forwards keep the decode step as cheap as without chunking, and the budget bounds the
step's tokens either way. A chunk may split an image's tokens: the chunk takes the input embeddings of the image
tokens inside it (counted from the image tokens before it), so a budget smaller than an image still works.

Rows with an image read AGF's keys/values from their image's slot at each chunk and each step (a CLI adapter's
rows; text-only rows of the same model pass through AGF unchanged). Positions count each row's real tokens only and
a row's attention sees exactly its own prompt and answer, so each row computes what it would alone: greedy answers
equal sequential ones. Log-probabilities are the model's (log-softmax of the raw logits), as vLLM reports them.

Threads: ``prepare`` may run on another thread than ``fits``/``add``/``step``/``cancel``, which must share one
(decoder forwards of adapters over one base must not interleave); the engine detokenises with its own copy of the
tokenizer, so the two threads never use one tokenizer at once.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cli_module.model import FusedVLM, VisualState
from cli_module.prompting import render

from .detokenize import IncrementalText
from .kv_budget import KVBudget
from .kv_slots import SlotCache
from .sampler import BatchParams, RowState, choose, process_logits
from .serve_api import IMAGE, ApiError, ChatJob, Delta, End, Event
from .serve_batch import Batch, Prefill, Row

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


class Engine:
    """Continuous batching over ``models`` (id -> FusedVLM in eval mode, all over one base, on one device)."""

    def __init__(self, models: dict[str, FusedVLM], max_rows: int, max_prompt_tokens: int,
                 max_step_tokens: int = 512, kv_cache_bytes: int | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_step_tokens < max_rows:
            raise ValueError(f"max_step_tokens={max_step_tokens} is below max_rows={max_rows}: every decoding row "
                             f"takes one token of a step's budget and a prefill needs at least one more; raise "
                             f"max_step_tokens or lower max_rows")
        self.models, self.max_rows, self.max_prompt_tokens = models, max_rows, max_prompt_tokens
        self.max_step_tokens = max_step_tokens  # tokens per step: decoding rows (1 each) + prompt chunks
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
        self.kv = KVBudget.of(models, max_rows, kv_cache_bytes, self.device)  # admission by KV bytes
        self.batches: dict[str, Batch] = {}  # model id -> its rows (storage kept, reused, between requests)
        self.choices: dict[str, int] = {}  # request id -> its choices still decoding (or prefilling)
        self.reserved: dict[str, int] = {}  # request id -> the KV bytes it reserved
        self.admitted = 0  # requests admitted so far (their admission order: chunks go to the oldest first)
        self.pieces: dict[int, str] = {}  # token id -> its text alone (log-probability labels)
        self.generated: Counter[str] = Counter()  # model id -> tokens generated
        self.prompt_tokens: Counter[str] = Counter()  # model id -> prompt tokens prefilled
        self.batch_sizes: Counter[int] = Counter()  # rows in a batch's decode step -> steps
        self.step_tokens: Counter[int] = Counter()  # tokens in an engine step (decode rows + chunks) -> steps
        self.cancelled_rows = 0  # rows dropped because their request was cancelled

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows holding a KV slot now: decoding, or admitted and being prefilled."""
        return sum(b.slots_used for b in list(self.batches.values()))

    def snapshot(self) -> dict[str, Any]:
        """Counters for metrics, safe to read from another thread while the engine runs (copies under the GIL).
        ``kv_reserved_bytes`` / ``kv_total_bytes``: the KV budget (admission); ``kv_bytes``: the storage allocated."""
        batches = list(self.batches.values())
        return {"running_rows": self.rows, "prefilling_requests": sum(len(b.prefilling) for b in batches),
                "batch_sizes": dict(self.batch_sizes), "step_tokens": dict(self.step_tokens),
                "generated": dict(self.generated), "prompt_tokens": dict(self.prompt_tokens),
                "cancelled_rows": self.cancelled_rows, "kv_bytes": sum(b.kv.nbytes() for b in batches),
                "kv_reserved_bytes": self.kv.reserved, "kv_total_bytes": self.kv.total}

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
        self.kv.check(job.model, n, job.max_tokens, job.n)  # could never be admitted: refused now
        return Prepared(request_id=request_id, job=replace(job, images=[]), ids=ids, visual=visual)

    # --- engine thread -------------------------------------------------------------------------------------

    def fits(self, items: list[Prepared]) -> bool:
        """Whether ``items`` can be admitted now: their rows in the free rows and their KV reservation in the bytes
        not reserved by the requests running or prefilling."""
        return sum(i.job.n for i in items) <= self.free_rows and self.kv.fits(sum(self._need(i) for i in items))

    def admissible(self, item: Prepared) -> None:
        """ApiError 400 when ``item`` could not be admitted even by an idle engine (rows or KV budget)."""
        if item.job.n > self.max_rows:
            raise ApiError(400, f"n={item.job.n} exceeds this replica's rows ({self.max_rows})", param="n")
        self.kv.check(item.job.model, item.prompt_tokens, item.job.max_tokens, item.job.n)

    @torch.inference_mode()
    def add(self, items: list[Prepared]) -> list[tuple[str, Event]]:
        """Admit new requests (``fits`` them first): their rows take the slots after the requests already prefilling
        and their KV bytes are reserved; the next steps prefill their prompts in chunks, and each emits its first
        token at the step that writes its prompt's last chunk. -> the events of requests that could not be
        admitted (an error each)."""
        if not self.fits(items):
            raise ValueError(f"{sum(i.job.n for i in items)} new rows reserving {sum(self._need(i) for i in items)} "
                             f"bytes of KV cache do not fit in {self.free_rows} free rows and "
                             f"{self.kv.total - self.kv.reserved} unreserved bytes; call fits() first")
        events: list[tuple[str, Event]] = []
        for item in items:
            try:
                self._admit(item)
            except Exception as err:  # one failed admission ends its own request only
                logger.exception("crosslayer: admission failed")
                events.append((item.request_id, End(error=ApiError.internal(err, during="prefilling"))))
        return events

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Event]]:
        """One engine step under the token budget: one decode forward per model over its decoding rows (a token
        each), then the rest of ``max_step_tokens`` goes to prompt chunks of the prefilling requests, oldest first
        (one chunk forward per model); a request whose last chunk ran emits its first token here and decodes from
        the next step on. Finished rows leave."""
        events: list[tuple[str, Event]] = []
        decoded = 0
        for model_id, batch in list(self.batches.items()):
            if not batch.rows:
                continue
            decoded += len(batch.rows)
            try:
                events += self._decode(model_id, batch)
            except Exception as err:  # a failing batch ends its own requests; the others go on
                logger.exception("crosslayer: decode step failed")
                events += self._fail(batch, err)
        plan = self._plan(self.max_step_tokens - decoded)
        for model_id, chunks in plan.items():
            batch = self.batches[model_id]
            try:
                events += self._prefill(model_id, batch, chunks)
            except Exception as err:  # one failed chunk forward ends its own requests only
                logger.exception("crosslayer: prefill failed")
                ended = {p.item.request_id for p, _ in chunks}
                for row in [*batch.rows, *(r for p in batch.prefilling for r in p.rows)]:
                    row.cancelled = row.cancelled or row.request_id in ended
                batch.retire()
                events += [(rid, End(error=ApiError.internal(err, during="prefilling")))
                           for rid in ended if self._forget(rid)]
        tokens = decoded + sum(c for chunks in plan.values() for _, c in chunks)
        if tokens:
            self.step_tokens[tokens] += 1
        return events

    @torch.inference_mode()
    def cancel(self, request_ids: set[str]) -> None:
        """Drop the rows of these requests, decoding or still prefilling (their clients went away); they send
        nothing more, and their slots and KV reservations are free for the next admission."""
        if not request_ids:
            return
        for rid in request_ids:
            self._forget(rid)
        for batch in self.batches.values():
            for row in [*batch.rows, *(r for p in batch.prefilling for r in p.rows)]:
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
        self.reserved.clear()
        self.kv.reserved = 0

    # --- internals ------------------------------------------------------------------------------------------

    def _batch(self, model_id: str) -> Batch:
        if model_id not in self.batches:
            self.batches[model_id] = Batch(self.models[model_id], self.vocab, self.device, self.max_rows)
        return self.batches[model_id]

    def _need(self, item: Prepared) -> int:
        return self.kv.need(item.job.model, item.prompt_tokens, item.job.max_tokens, item.job.n)

    def _forget(self, request_id: str) -> bool:
        """The request ended, failed or was cancelled: its choices and KV reservation go; -> whether it was open."""
        self.kv.reserved -= self.reserved.pop(request_id, 0)
        return self.choices.pop(request_id, None) is not None

    def _fail(self, batch: Batch, err: Exception) -> list[tuple[str, Event]]:
        """End every request of ``batch``, decoding or prefilling, with ``err``; the batch is emptied."""
        rows = [*batch.rows, *(r for p in batch.prefilling for r in p.rows)]
        batch.clear()
        return [(rid, End(error=ApiError.internal(err, during="generating")))
                for rid in dict.fromkeys(r.request_id for r in rows) if self._forget(rid)]

    def _admit(self, item: Prepared) -> None:
        batch = self._batch(item.job.model)
        n, need = item.job.n, self._need(item)
        rows = [self._new_row(item, i) for i in range(n)]
        prefill = Prefill(item=item, rows=rows, seq=self.admitted)
        if item.visual is not None:
            image = (item.ids[0] == self.image_token_id).long()  # (S,)
            prefill.image_before = torch.cat([image.new_zeros(1), image.cumsum(0)]).tolist()  # S + 1
            if batch.model.base.qwen:  # M-RoPE: the whole prompt's positions once, sliced by every chunk
                from cli_module.qwen import rope_index

                ids = item.ids.to(self.device)
                prefill.rope_positions = rope_index(batch.model.base, ids, ids == self.image_token_id,
                                                    item.visual.grids, None)[0][:, 0]  # (3, S)
                for row in rows:
                    row.rope_delta = int(item.visual.rope_deltas[0])
            if batch.model.config.method == "cli":  # one AGF slot per image, shared by its n rows
                prefill.image_slot = batch.images.add(item.visual.kv, n)
                for row in rows:
                    row.image_slot = prefill.image_slot
        used = batch.slots_used
        longest = max([*batch.lengths, *(p.done for p in batch.prefilling)], default=0)
        batch.kv.reserve(used + n, item.prompt_tokens + item.job.max_tokens, used=used, used_length=longest)
        batch.prefilling.append(prefill)
        self.admitted += 1
        self.choices[item.request_id] = n
        self.reserved[item.request_id] = need
        self.kv.reserved += need

    def _plan(self, budget: int) -> dict[str, list[tuple[Prefill, int]]]:
        """The step's prompt chunks: ``budget`` tokens to the prefilling requests, oldest first; a prompt longer
        than what is left takes it all and goes on at the next step -> model id -> [(request, chunk tokens)], each
        list a prefix of its batch's prefilling requests, in order."""
        plan: dict[str, list[tuple[Prefill, int]]] = {}
        for p in sorted((p for b in self.batches.values() for p in b.prefilling), key=lambda p: p.seq):
            if budget <= 0:
                break
            take = min(p.left, budget)
            plan.setdefault(p.item.job.model, []).append((p, take))
            budget -= take
        return plan

    def _prefill(self, model_id: str, batch: Batch, chunks: list[tuple[Prefill, int]]) -> list[tuple[str, Event]]:
        """One chunk forward over ``chunks`` (the first requests of ``batch.prefilling``, in order): chunk b writes
        its prompt's positions [done, done + c) into its request's n slots and attends to the slot's earlier
        positions and itself, causally. The requests whose prompt is then whole sample their first token and
        become decoding rows."""
        model = batch.model
        pad = model.base.tokenizer.pad_token_id or 0
        width = max(c for _, c in chunks)
        ids = torch.full((len(chunks), width), pad, dtype=torch.long, device=self.device)  # (P, C) left-padded
        positions = torch.zeros_like(ids)  # (P, C) prompt positions; padding at 0 (it reads position 0 only)
        slot, src, seq, pos, reads = [], [], [], [], []
        first = len(batch.rows)  # the first request's first slot
        for b, (p, c) in enumerate(chunks):
            span = torch.arange(p.done, p.done + c)
            ids[b, width - c:] = p.item.ids[0, p.done:p.done + c]
            positions[b, width - c:] = span
            reads.append(first)
            for j in range(p.n):  # one write per (slot, chunk token): all n slots of the request
                slot.append(torch.full((c,), first + j))
                src.append(torch.full((c,), b))
                seq.append(torch.arange(width - c, width))
                pos.append(span)
            first += p.n
        read = max(p.done + c for p, c in chunks)
        mask = torch.arange(read, device=self.device)[None, None] <= positions[:, :, None]  # (P, C, read) causal
        position_ids = positions  # (P, C) the slot positions, which the mask reads
        if model.base.qwen:  # M-RoPE (3, P, C): an image prompt's own positions, the text's on all three axes
            position_ids = positions[None].expand(3, -1, -1).clone()
            for b, (p, c) in enumerate(chunks):
                if p.rope_positions is not None:
                    position_ids[:, b, width - c:] = p.rope_positions[:, p.done:p.done + c]
        cache = SlotCache(batch.kv, "chunk", pos=torch.cat(pos).to(self.device), rows=torch.cat(slot).to(self.device),
                          src=torch.cat(src).to(self.device), seq=torch.cat(seq).to(self.device), read=read,
                          reads=torch.tensor(reads, device=self.device))
        done = [p for p, c in chunks if c == p.left]  # the prompts this chunk completes: a prefix of ``chunks``
        out = model(ids, mask[:, None], position_ids=position_ids, visual=self._chunk_visual(batch, chunks),
                    cache=cache, use_cache=True, return_gates=any(p.item.job.return_gates for p in done),
                    logits_to_keep=1)
        for p, c in chunks:
            p.done += c
            self.prompt_tokens[model_id] += c
        if not done:
            return []
        src_rows = torch.tensor([b for b, p in enumerate(done) for _ in range(p.n)], device=self.device)  # (R,)
        rows = [r for p in done for r in p.rows]
        params = BatchParams.of([r.params for r in rows], [r.generator for r in rows], self.vocab, self.device)
        state = RowState.new([r.params for r in rows], [p.item.ids[0] for p in done for _ in range(p.n)], self.vocab,
                             self.device)
        gates = out.gates[:, -1][src_rows] if out.gates is not None else None  # (R, |T|, K)
        tokens, events = self._choose(model_id, rows, out.logits[:, -1].float()[src_rows], params, state, gates)
        batch.promote(len(done), tokens, state)
        batch.retire()
        return events

    def _chunk_visual(self, batch: Batch, chunks: list[tuple[Prefill, int]]) -> VisualState | None:
        """The visual state of a chunk forward: for its rows with an image (in row order), the input embeddings of
        the image tokens inside their chunk (a chunk may split an image's tokens: its embeddings are sliced by the
        image tokens before the chunk), per-position tokens sliced the same way and concatenated along the
        positions, (1, K, Σ, D) (deepstack adds them at the image positions in that order), and CLI's AGF keys and
        values from the rows' image slots (read at every chunk)."""
        has = [p.item.visual is not None for p, _ in chunks]
        if not any(has):
            return None
        embeds, tokens, slots, stacks = [], [], [], []
        for p, c in chunks:
            visual = p.item.visual
            if visual is None:
                continue
            a, b = p.image_before[p.done], p.image_before[p.done + c]  # the image tokens in this chunk: [a, b)
            if b > a:
                embeds.append(visual.image_embeds[a:b])  # (b - a, D)
                if visual.tokens is not None and visual.tokens.shape[2] == visual.counts[0]:
                    tokens.append(visual.tokens[:, :, a:b])  # (1, K, b - a, D)
                if visual.deepstack_embeds is not None:  # Qwen3-VL's own DeepStack: per decoder layer (b - a, D)
                    stacks.append([d[a:b] for d in visual.deepstack_embeds])
            slots.append(p.image_slot)
        kv, token_mask = [], None
        if batch.model.config.method == "cli":
            reading = torch.tensor(slots, device=self.device)
            kv, token_mask = batch.images.gather(reading), batch.images.mask(reading)  # mask: padded Qwen images
        return VisualState(image_embeds=torch.cat(embeds) if embeds else None,
                           tokens=torch.cat(tokens, dim=2) if tokens else None, kv=kv, counts=[],
                           rows=None if all(has) else torch.tensor(has, device=self.device), token_mask=token_mask,
                           deepstack_embeds=[torch.cat(d) for d in zip(*stacks)] if stacks else None)

    def _decode(self, model_id: str, batch: Batch) -> list[tuple[str, Event]]:
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

    def _new_row(self, item: Prepared, index: int) -> Row:
        p = item.job.sampling
        generator = None
        if not p.greedy and p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed + index)
        return Row(request_id=item.request_id, index=index, job=item.job, generator=generator,
                    text=IncrementalText(self.detok, item.job.stop))

    def _choose(self, model_id: str, rows: list[Row], logits: torch.Tensor, params: BatchParams, state: RowState,
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
                elif self._forget(row.request_id):
                    events.append((row.request_id, End()))
        self.generated[model_id] += len(rows)
        return chosen, events

    def _advance(self, row: Row, token: int, entries: list[dict[str, Any]] | None, gates: Any, rows: int) -> Delta:
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


def gate_summary(row: Row, job: ChatJob, config: Any) -> dict[str, Any]:
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
