"""The serving engine: continuous batching of chat requests over FusedVLMs that share one base, in plain PyTorch
(no Ray: ``pipelines.serve_scheduler`` drives it from asyncio, ``pipelines.serve_model`` puts it in Serve).

A request becomes one row per choice (``n``). Rows join the running batch between two decode steps and leave it
as soon as they finish or are cancelled:

  prepare (any thread)   chat template, prompt limits, tokeniser, image -> encoder -> projector, AMP tokens and AGF
                         keys/values (``FusedVLM.prepare_inputs``): everything but the decoder
  add (engine thread)    prefill of the new requests, grouped by (model, has image), one left-padded forward per
                         group; each emits its first token at once; its rows (n copies of the prompt's KV cache)
                         join their decode group
  step (engine thread)   one forward per decode group: every row gets its next token; finished rows leave at once
  cancel (engine thread) the rows of cancelled requests leave before the next step

A decode group is one model (an adapter, or the bare base) plus whether its rows read AGF's visual keys/values at
each step (a CLI adapter's rows with an image). Its state is one KV cache (B, H, L, dh) per decoder layer, one
attention mask (B, L), AGF keys/values (B, H, K, N, dh) per injection layer and the next input token (B,). Rows
of different prompt lengths are left-padded to the longest; the mask hides the padding and positions count real
tokens only (``FusedVLM.forward``), so each row computes what it would alone: greedy answers equal sequential
ones. Leading columns no row needs are trimmed when rows leave. Each step decodes every group once, in turn.

Choosing a token, per row: logits (the image placeholder never chosen) -> repetition, presence and frequency
penalties, logit_bias, min_tokens -> argmax at temperature 0, else temperature, top_k, softmax, min_p, top_p and a
draw from the row's own generator (``seed + choice``: the same answer whatever else is in the batch).
Log-probabilities are the model's (log-softmax of the raw logits), as vLLM reports them by default.

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
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cli_module.model import FusedVLM, VisualState
from cli_module.prompting import render

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
    generator: torch.Generator | None  # its own sampling generator (seeded: seed + index), None when greedy
    prompt: torch.Tensor | None  # (P,) distinct prompt token ids, kept for repetition_penalty only
    tokens: list[int] = field(default_factory=list)  # every generated token (EOS included)
    text_ids: list[int] = field(default_factory=list)  # generated tokens that are part of the text (EOS excluded)
    counts: Counter[int] = field(default_factory=Counter)  # text token -> occurrences (presence/frequency)
    pieces: list[str] = field(default_factory=list)  # each generated token decoded alone (gate heatmap labels)
    gates: list[Any] = field(default_factory=list)  # per generated token, (|T|, K) numpy, when return_gates
    sent: str = ""  # text already emitted
    finish: str | None = None  # "stop" or "length" once done
    cancelled: bool = False  # its client went away

    @property
    def params(self) -> SamplingParams:
        return self.job.sampling


class _Group:
    """Rows decoding together: one model, one left-padded KV cache, one mask, one AGF visual state."""

    def __init__(self, model: FusedVLM):
        self.model = model
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None  # per decoder layer keys/values (B, H, L, dh)
        self.mask: torch.Tensor | None = None  # (B, L) 1 for real tokens, 0 for left padding
        self.visual_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per injection layer (B, H, K, N, dh)
        self.next_tokens: torch.Tensor | None = None  # (B,) each row's last chosen token: the next step's input

    def join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor,
             visual_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, tokens: torch.Tensor) -> None:
        """Append rows (their cache (R, H, L', dh), mask (R, L'), next tokens (R,)), left-padding to one length."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.visual_kv, self.next_tokens = rows, cache, mask, visual_kv, tokens
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # (B, H, L, dh) -> (B, H, n + L, dh), zeros first
            return F.pad(t, (0, 0, n, 0)) if n else t

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad(mine.keys, width - old), pad(theirs.keys, width - new)])
            mine.values = torch.cat([pad(mine.values, width - old), pad(theirs.values, width - new)])
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))])
        if self.visual_kv is not None:
            self.visual_kv = [(torch.cat([k, k2]), torch.cat([v, v2]))
                              for (k, v), (k2, v2) in zip(self.visual_kv, visual_kv)]
        self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.rows = self.rows + rows

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``; trim the leading mask columns no kept row needs."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.visual_kv = self.next_tokens = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]  # (B', L)
        lead = int((mask.cumsum(1) == 0).sum(1).min())  # padding columns shared by every kept row
        self.mask = mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, lead:], layer.values[idx, :, lead:]
        if self.visual_kv is not None:
            self.visual_kv = [(k[idx], v[idx]) for k, v in self.visual_kv]
        self.next_tokens = self.next_tokens[idx]


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
        self.image_token_id = first.base.image_token_id
        self.vocab = first.base.lm_head.weight.shape[0]
        self.byte_level = type(getattr(self.detok.backend_tokenizer, "decoder", None)).__name__ == "ByteLevel"
        for model in models.values():
            kinds = {type(layer).__name__ for layer in DynamicCache(config=model.base.text_config).layers}
            if kinds != {DynamicLayer.__name__}:
                raise ValueError(f"continuous batching needs full-attention KV cache layers; this base's cache has "
                                 f"{sorted(kinds)}")
        self.groups: dict[tuple[str, bool], _Group] = {}  # (model id, rows read AGF visual keys/values) -> group
        self.choices: dict[str, int] = {}  # request id -> its choices still decoding
        self.pieces: dict[int, str] = {}  # token id -> its text alone (log-probability labels)
        self.generated: Counter[str] = Counter()  # model id -> tokens generated
        self.prompt_tokens: Counter[str] = Counter()  # model id -> prompt tokens prefilled
        self.batch_sizes: Counter[int] = Counter()  # rows in a group's decode step -> steps
        self.cancelled_rows = 0  # rows dropped because their request was cancelled

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        return sum(len(g.rows) for g in list(self.groups.values()))

    def snapshot(self) -> dict[str, Any]:
        """Counters for metrics, safe to read from another thread while the engine runs (copies under the GIL)."""
        return {"running_rows": self.rows, "batch_sizes": dict(self.batch_sizes), "generated": dict(self.generated),
                "prompt_tokens": dict(self.prompt_tokens), "cancelled_rows": self.cancelled_rows}

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
            prompt = render(tok, messages, add_generation_prompt=True)
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
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        out, start = [], 0
        for b, n in enumerate(lengths):
            one = None
            if visual is not None:  # row b's share: its image tokens, AMP tokens and AGF keys/values
                count = visual.counts[b]
                one = replace(visual, counts=[count],
                              image_embeds=None if visual.image_embeds is None else
                              visual.image_embeds[start:start + count],
                              tokens=None if visual.tokens is None else visual.tokens[b:b + 1],
                              kv=[(k[b:b + 1], v[b:b + 1]) for k, v in visual.kv])
                start += count
            out.append((enc["input_ids"][b:b + 1, -int(n):], one))  # left-padded: the last n are the prompt
        return out

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
        """Prefill new requests; each emits its first token and its rows join their decode group."""
        if sum(i.job.n for i in items) > self.free_rows:
            raise ValueError(f"{sum(i.job.n for i in items)} new rows do not fit in {self.free_rows} free rows")
        batches: dict[tuple[str, bool], list[Prepared]] = {}
        for item in items:
            batches.setdefault((item.job.model, item.visual is not None), []).append(item)
        events: list[tuple[str, Event]] = []
        for (model_id, has_image), batch in batches.items():
            try:
                events += self._prefill(model_id, has_image, batch)
            except Exception as err:  # one failed prefill ends its own requests only
                logger.exception("crosslayer: prefill failed")
                for item in batch:
                    self.choices.pop(item.request_id, None)
                    events.append((item.request_id, End(error=ApiError.internal(err, during="prefilling"))))
        return events

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Event]]:
        """One decode step of every group: one new token per row; finished rows leave."""
        events: list[tuple[str, Event]] = []
        for key, group in list(self.groups.items()):
            try:
                events += self._decode(key[0], group)
            except Exception as err:  # a failing group ends its own requests; the others go on
                logger.exception("crosslayer: decode step failed")
                del self.groups[key]
                for rid in dict.fromkeys(r.request_id for r in group.rows):
                    if self.choices.pop(rid, None) is not None:
                        events.append((rid, End(error=ApiError.internal(err, during="generating"))))
        return events

    def cancel(self, request_ids: set[str]) -> None:
        """Drop the rows of these requests (their clients went away); they send nothing more."""
        if not request_ids:
            return
        for rid in request_ids:
            self.choices.pop(rid, None)
        for group in self.groups.values():
            for row in group.rows:
                if row.request_id in request_ids:
                    row.cancelled = True
                    self.cancelled_rows += 1
        self._retire()

    def reset(self) -> None:
        """Forget every row (after a failure the scheduler could not attribute)."""
        self.groups.clear()
        self.choices.clear()

    # --- internals ------------------------------------------------------------------------------------------

    def _prefill(self, model_id: str, has_image: bool, batch: list[Prepared]) -> list[tuple[str, Event]]:
        model = self.models[model_id]
        pad = model.base.tokenizer.pad_token_id or 0
        width = max(item.prompt_tokens for item in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long, device=self.device)  # (B, S) left-padded
        mask = torch.zeros_like(ids)
        for b, item in enumerate(batch):
            ids[b, width - item.prompt_tokens:] = item.ids[0]
            mask[b, width - item.prompt_tokens:] = 1
        visual = merge_visual([item.visual for item in batch]) if has_image else None
        rows = [self._new_row(item, i) for item in batch for i in range(item.job.n)]
        gates_wanted = any(r.job.return_gates for r in rows)
        cache = DynamicCache(config=model.base.text_config)
        out = model(ids, mask, visual=visual, cache=cache, use_cache=True, return_gates=gates_wanted,
                    logits_to_keep=1)
        src = torch.tensor([b for b, item in enumerate(batch) for _ in range(item.job.n)], device=self.device)
        for layer in cache.layers:  # one copy of the prompt's cache per choice
            layer.keys, layer.values = layer.keys[src], layer.values[src]
        gates = out.gates[:, -1][src] if out.gates is not None else None  # (R, |T|, K)
        for item in batch:
            self.choices[item.request_id] = item.job.n
            self.prompt_tokens[model_id] += item.prompt_tokens
        tokens, events = self._choose(model_id, rows, out.logits[:, -1].float()[src], gates)  # logits (R, V)
        reads_visual = has_image and model.config.method == "cli"
        visual_kv = [(k[src], v[src]) for k, v in visual.kv] if reads_visual else None
        group = self.groups.setdefault((model_id, reads_visual), _Group(model))
        group.join(rows, cache, mask[src], visual_kv, tokens)
        self._retire()
        return events

    def _decode(self, model_id: str, group: _Group) -> list[tuple[str, Event]]:
        b = len(group.rows)
        group.mask = torch.cat([group.mask, group.mask.new_ones(b, 1)], dim=1)  # (B, L + 1)
        visual = None if group.visual_kv is None else \
            VisualState(image_embeds=None, tokens=None, kv=group.visual_kv, counts=[])
        gates_wanted = any(r.job.return_gates for r in group.rows)
        out = group.model(group.next_tokens[:, None], group.mask, visual=visual, cache=group.cache,
                          use_cache=True, return_gates=gates_wanted, logits_to_keep=1)
        gates = out.gates[:, -1] if out.gates is not None else None  # (B, |T|, K)
        group.next_tokens, events = self._choose(model_id, group.rows, out.logits[:, -1].float(), gates)
        self.batch_sizes[b] += 1
        self._retire()
        return events

    def _retire(self) -> None:
        for key, group in list(self.groups.items()):
            group.keep([i for i, r in enumerate(group.rows) if r.finish is None and not r.cancelled])
            if not group.rows:
                del self.groups[key]

    def _new_row(self, item: Prepared, index: int) -> _Row:
        p = item.job.sampling
        generator = None
        if not p.greedy and p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed + index)
        prompt = item.ids[0].unique() if p.repetition_penalty != 1.0 else None
        return _Row(request_id=item.request_id, index=index, job=item.job, generator=generator, prompt=prompt)

    def _choose(self, model_id: str, rows: list[_Row], logits: torch.Tensor,
                gates: torch.Tensor | None) -> tuple[torch.Tensor, list[tuple[str, Event]]]:
        """logits (R, V) float -> each row's token (R,) and its events (a Delta; an End after a request's last)."""
        logits[:, self.image_token_id] = float("-inf")  # a placeholder is never an answer
        logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in rows) else None
        chosen = logits.argmax(dim=-1)  # (R,)
        for b, row in enumerate(rows):
            if not row.params.greedy or row.params.processes_logits:
                chosen[b] = self._pick(row, logits[b])
        events: list[tuple[str, Event]] = []
        for b, (row, token) in enumerate(zip(rows, chosen.tolist())):
            events.append((row.request_id, self._advance(row, token, None if logprobs is None else logprobs[b],
                                                         None if gates is None else gates[b], len(rows))))
            if row.finish is not None:
                left = self.choices.get(row.request_id, 0) - 1
                if left > 0:
                    self.choices[row.request_id] = left
                elif self.choices.pop(row.request_id, None) is not None:
                    events.append((row.request_id, End()))
        self.generated[model_id] += len(rows)
        return chosen, events

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        """One row's token from its logits (V,): penalties, bias and min_tokens, then greedy or sampled."""
        p, x = row.params, logits.clone()
        if p.repetition_penalty != 1.0:
            seen = torch.cat([row.prompt, torch.tensor(row.tokens, dtype=torch.long, device=x.device)]).unique()
            s = x[seen]
            x[seen] = torch.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.counts:
            ids = torch.tensor(list(row.counts), device=x.device)
            counts = torch.tensor(list(row.counts.values()), dtype=x.dtype, device=x.device)
            x[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=x.device)
            x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=x.dtype, device=x.device)
        if len(row.tokens) < p.min_tokens and self.eos:
            x[sorted(self.eos)] = float("-inf")
        return sample_token(x, p, row.generator)

    def _advance(self, row: _Row, token: int, logprobs: torch.Tensor | None, gates: torch.Tensor | None,
                 rows: int) -> Delta:
        job = row.job
        row.tokens.append(token)
        if job.return_gates:
            row.pieces.append(self._piece(token))
            if gates is not None:
                row.gates.append(gates.float().cpu().numpy())
        entries = None
        if token in self.eos:
            row.finish = "stop"
        else:
            row.text_ids.append(token)
            row.counts[token] += 1
            if logprobs is not None and row.params.logprobs:
                entries = [self._logprob_entry(logprobs, token, row.params.top_logprobs)]
            if len(row.tokens) >= job.max_tokens:
                row.finish = "length"
        text = self.detok.decode(row.text_ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if cuts:
            text, row.finish = text[: min(cuts)], "stop"
        end = len(text)
        if row.finish is None:  # hold back what may still become a stop sequence or a multi-byte character
            end -= max((len(s) for s in job.stop), default=1) - 1
            while end > len(row.sent) and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[len(row.sent): max(end, len(row.sent))]
        row.sent += delta
        summary = gate_summary(row, row.job, self.models[job.model].config) \
            if row.finish is not None and job.return_gates else None
        return Delta(index=row.index, text=delta, tokens=len(row.tokens), logprobs=entries,
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


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """logits (V,) -> a token: argmax at temperature 0, else temperature, top_k, min_p and top_p, then one draw
    (at top_k = 0 and min_p = 0 exactly what ``FusedVLM.stream`` samples for one row)."""
    if p.greedy:
        return int(logits.argmax())
    x = logits[None] / p.temperature  # (1, V)
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return int(torch.multinomial(probs, 1, generator=generator))


def merge_visual(states: list[VisualState]) -> VisualState:
    """Concatenate per-request VisualStates along the batch (the order of the rows and their image tokens)."""
    if len(states) == 1:
        return states[0]

    def cat(tensors: list[Any]) -> Any:
        return None if tensors[0] is None else torch.cat(tensors)

    kv = [(torch.cat([s.kv[i][0] for s in states]), torch.cat([s.kv[i][1] for s in states]))
          for i in range(len(states[0].kv))]
    return VisualState(image_embeds=cat([s.image_embeds for s in states]), tokens=cat([s.tokens for s in states]),
                       kv=kv, counts=[c for s in states for c in s.counts])


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
