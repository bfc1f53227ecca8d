"""Online serving: an OpenAI-compatible chat API over CLI adapters on Ray Serve (``crosslayer serve``).

One Serve application, two deployments:
  HTTP ──> OpenAIIngress (FastAPI: auth, body/image/token limits, image decoding, SSE)
              │ DeploymentHandle, one streamed call per request
              ▼
           VLMModel (one base, loaded once, + every adapter over it; @serve.batch groups concurrent requests,
                     generation uses the KV cache and AGF's per-image keys/values; autoscaled)
Routes: ``POST /v1/chat/completions`` (text + ``image_url`` parts, ``data:`` base64 URLs, ``stream: true`` as
server-sent events ending in ``data: [DONE]``, ``usage``; ``"return_gates": true`` adds the AGF gates per
generated token, injection layer and vision layer), ``GET /v1/models``, ``GET /healthz`` (batch sizes seen and
the request / rejection / generated-token tallies of the replicas that answered).
Metrics: Serve's own (``ray_serve_*``) plus three ``ray.util.metrics`` counters, created in the deployments'
``__init__`` and exported by Ray's metrics agent with a ``ray_`` prefix: ``crosslayer_requests_total``
{model, status} (every chat completion request, by its HTTP status; model "unknown" until the request names a
served model), ``crosslayer_rejected_requests_total`` {model, reason} (the 4xx answers of chat and models
routes: auth, limits, bad input, unknown model, prompt too long; and 503 overloaded; reason is the error code)
and ``crosslayer_generated_tokens_total`` {model} (every decoded token, EOS included, as ``usage`` counts them).
This file holds the batching generation engine, both deployments, ``app_builder`` and the command;
``pipelines.serve_api`` holds ``ServeConfig`` (every limit), the OpenAI-style ``ApiError`` and request parsing.
``app_builder`` is the ``import_path`` target of ``cluster/serve/config.yaml`` (``serve run`` / ``serve deploy``).
Torch is imported inside the model deployment only, so ingress replicas stay light. No ``from __future__ import
annotations`` here: FastAPI must see the route parameters' real types through Serve's ingress wrapper.
"""

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .serve_api import IMAGE, ApiError, ChatJob, ServeConfig, StreamOptions, parse_chat_request, read_json

logger = logging.getLogger("ray.serve")


# --- model deployment ---------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    """One request inside a replica: tokenised, its image encoded and projected."""

    job: ChatJob
    ids: Any  # (1, S) prompt token ids, each <image> expanded to its feature count
    visual: Any  # VisualState or None
    prompt_tokens: int  # S

    def group_key(self) -> tuple:
        """Requests with equal keys decode in one forward: same weights, inputs kind and sampler. A seeded
        sampled request decodes alone, so its seed gives the same answer whatever else is in the batch."""
        job = self.job
        sampler = (job.temperature, job.top_p, id(self) if job.seed is not None else None) if job.temperature > 0 \
            else (0.0,)
        return (job.model, self.visual is not None, job.return_gates, *sampler)


@dataclass
class _Row:
    """Decoding state of one request in a running group: text sent so far, tokens, gates."""

    item: _Prepared
    ids: list[int] = field(default_factory=list)  # generated tokens that are part of the text (EOS excluded)
    pieces: list[str] = field(default_factory=list)  # every generated token, decoded alone (heatmap labels)
    gates: list[Any] = field(default_factory=list)  # per generated token, (|T|, K) numpy
    sent: str = ""  # text already emitted
    finish: str | None = None  # "stop" or "length" once done
    closed: bool = False  # the final event was emitted


class _Group:
    """Several prepared requests decoded together: one left-padded batch, one ``FusedVLM.stream``."""

    def __init__(self, model: Any, items: list[_Prepared], device: str):
        import torch

        tok = model.base.tokenizer
        self.model, self.tok, self.rows = model, tok, [_Row(item) for item in items]
        self.eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        width = max(i.ids.shape[1] for i in items)
        ids = torch.full((len(items), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, item in enumerate(items):
            ids[b, width - item.ids.shape[1]:] = item.ids[0]
            mask[b, width - item.ids.shape[1]:] = 1
        job = items[0].job
        visual = merge_visual([i.visual for i in items]) if items[0].visual is not None else None
        self.steps = model.stream(ids.to(device), mask.to(device), visual=visual,
                                  max_new_tokens=max(i.job.max_tokens for i in items), temperature=job.temperature,
                                  top_p=job.top_p, seed=job.seed, eos_token_id=sorted(self.eos),
                                  return_gates=job.return_gates)
        self.done = False
        self.new_tokens = 0  # tokens the last step generated (rows that advanced)

    def step(self) -> list[Any]:
        """Decode one token for every row -> one event per row (StopIteration for rows already closed)."""
        out = next(self.steps, None)
        events = []
        self.new_tokens = 0
        for b, row in enumerate(self.rows):
            if row.closed:
                events.append(StopIteration)
                continue
            if out is None:
                row.finish = row.finish or "length"
            else:
                self._advance(row, int(out.tokens[b]), None if out.gates is None else out.gates[b])
                self.new_tokens += 1
            events.append(self._event(row))
        if all(r.closed for r in self.rows):
            self.steps.close()
            self.done = True
        return events

    def _advance(self, row: _Row, token: int, gates: Any) -> None:
        job = row.item.job
        row.pieces.append(self.tok.decode([token]))
        if gates is not None:
            row.gates.append(gates.float().cpu().numpy())
        if token in self.eos:
            row.finish = "stop"
            return
        row.ids.append(token)
        if len(row.pieces) >= job.max_tokens:
            row.finish = "length"

    def _event(self, row: _Row) -> dict[str, Any]:
        job = row.item.job
        text = self.tok.decode(row.ids, skip_special_tokens=True)
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
        event = {"delta": delta, "finish_reason": row.finish, "completion_tokens": len(row.pieces),
                 "batch_size": len(self.rows)}
        if row.finish is not None:
            row.closed = True
            if job.return_gates:
                event["gates"] = gate_summary(row, self.model.config)
        return event


def gate_summary(row: _Row, config: Any) -> dict[str, Any]:
    """(T, |T|, K) gates of one answer with their layer indices and token labels, as JSON-ready lists."""
    import numpy as np

    values = np.stack(row.gates) if row.gates else np.zeros((0, len(config.inject_layers), len(config.vision_layers)))
    return {"shape": list(values.shape), "inject_layers": list(config.inject_layers),
            "vision_layers": list(config.vision_layers), "tokens": row.pieces,
            "values": np.round(values.astype(float), 5).tolist()}


def merge_visual(states: list[Any]) -> Any:
    """Concatenate per-request VisualStates along the batch (the order of the rows and their image tokens)."""
    import torch

    from cli_module.model import VisualState

    if len(states) == 1:
        return states[0]

    def cat(tensors: list[Any]) -> Any:
        return None if tensors[0] is None else torch.cat(tensors)

    kv = [(torch.cat([s.kv[i][0] for s in states]), torch.cat([s.kv[i][1] for s in states]))
          for i in range(len(states[0].kv))]
    return VisualState(image_embeds=cat([s.image_embeds for s in states]), tokens=cat([s.tokens for s in states]),
                       kv=kv, counts=[c for s in states for c in s.counts])


def load_models(cfg: ServeConfig) -> dict[str, Any]:
    """Load the base once and every adapter over it: model id -> FusedVLM (eval mode).

    Adapters share the base object: each FusedVLM's hooks on the decoder layers act only while that model
    runs. An adapter that ``includes_projector`` (projector_ft) overwrites the base's projector in place when
    loaded, so it gets a base copy of its own; so does nothing else."""
    import torch

    from cli_module.adapter import load_model
    from cli_module.loading import load_base

    dtype = getattr(torch, cfg.dtype)
    shared = load_base(cfg.base, dtype=dtype)
    models = {}
    for ident, path in cfg.model_specs():
        models[ident], _ = load_model(path, base=cfg.base, dtype=dtype, shared=shared)
        models[ident].to(dtype).eval()
    return models


@serve.deployment(name="VLMModel")
class VLMModel:
    """Holds the base and its adapters; batches concurrent requests per (adapter, sampler) and streams tokens."""

    def __init__(self, config: ServeConfig):
        import ray
        import torch
        from ray.util import metrics

        self.cfg = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray exposes only the GPUs it assigned
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)  # deployments[] may override
        torch.set_num_threads(max(1, int(cpus)))
        self.models = {k: m.to(self.device) for k, m in load_models(config).items()}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslayer-model")  # torch work, in order
        self.waiting: deque[list[tuple[_Prepared, asyncio.Queue]]] = deque()  # batches the engine has not started
        self.engine: asyncio.Task | None = None  # the decode loop (_run_engine) while it has work
        self.batch_sizes: Counter[int] = Counter()
        self.generated: Counter[str] = Counter()  # model id -> tokens generated by this replica
        self.generated_metric = metrics.Counter("crosslayer_generated_tokens_total", tag_keys=("model",),
                                                description="Tokens generated (EOS included), per served model.")
        self.decode_batch.set_max_batch_size(config.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"models": list(self.models), "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch_size": self.cfg.max_batch_size, "device": self.device,
                "generated_tokens": dict(self.generated)}

    def _prepare(self, job: ChatJob) -> _Prepared:
        """Chat template, prompt token limit, image encoding (one request; runs on the model thread)."""
        from cli_module.prompting import render

        model = self.models[job.model]
        tok = model.base.tokenizer
        if job.return_gates and (model.config.method != "cli" or not job.images):
            raise ApiError(400, f"return_gates needs a CLI adapter (model {job.model!r} is method "
                                f"{model.config.method!r}) and an image in the request", param="return_gates")
        token = tok.convert_ids_to_tokens(model.base.image_token_id)
        messages = [{**m, "content": m["content"].replace(IMAGE, token)} for m in job.messages]
        if "system" not in (getattr(tok, "chat_template", None) or ""):  # template without a system role
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            messages = [m for m in messages if m["role"] != "system"]
            if system and messages:
                messages[0] = {**messages[0], "content": f"{system}\n\n{messages[0]['content']}"}
        prompt = render(tok, messages, add_generation_prompt=True)
        limit = self.cfg.max_prompt_tokens
        text_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if text_tokens > limit:
            raise ApiError(400, f"prompt has {text_tokens} tokens, over max_prompt_tokens={limit}",
                           param="messages", code="context_length_exceeded")
        enc, visual = model.prepare_inputs([prompt], job.images or None)
        n = int(enc["attention_mask"].sum())
        if n > limit:
            raise ApiError(400, f"prompt has {n} tokens with the image's, over max_prompt_tokens={limit}",
                           param="messages", code="context_length_exceeded")
        context = getattr(model.base.text_config, "max_position_embeddings", None)
        if context and n + job.max_tokens > context:
            raise ApiError(400, f"prompt ({n} tokens) + max_tokens ({job.max_tokens}) exceeds the model's context of "
                                f"{context} tokens", param="max_tokens", code="context_length_exceeded")
        return _Prepared(job=job, ids=enc["input_ids"], visual=visual, prompt_tokens=n)

    async def stream(self, job: ChatJob) -> AsyncIterator[dict[str, Any]]:
        """Events: {"prompt_tokens"} first, then {"delta", "finish_reason", ...} per token; or one error event."""
        loop = asyncio.get_running_loop()
        try:
            item = await loop.run_in_executor(self.pool, self._prepare, job)
        except ApiError as err:
            yield err.event()
            return
        except (ValueError, KeyError) as err:
            yield ApiError(400, f"could not prepare the request: {err}", code="invalid_request").event()
            return
        except Exception as err:  # never let one request take the replica down
            logger.exception("crosslayer: preparing a request failed")
            yield ApiError.internal(err, during="preparing the request").event()
            return
        yield {"prompt_tokens": item.prompt_tokens}
        try:
            events = await self.decode_batch(item)  # joins a batch; the engine decodes it when the model is free
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                yield event
        except Exception as err:
            logger.exception("crosslayer: decoding a batch failed")
            yield ApiError.internal(err, during="generating").event()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # real values set from ServeConfig in __init__
    async def decode_batch(self, items: list[_Prepared]) -> list[asyncio.Queue]:
        """Queues one collected batch for the engine; each request gets the queue its events will arrive on.

        Serve forms the next batch as soon as requests arrive, even while an earlier batch is still decoding, so
        the batches collected during a long generation are small. This handler therefore returns at once, and
        the engine merges every batch that waited into its next round (up to ``max_batch_size`` requests): a
        round is formed when the model is free, not when its first request arrived."""
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in items]
        self.waiting.append(list(zip(items, queues)))
        if self.engine is None or self.engine.done():
            self.engine = asyncio.create_task(self._run_engine())
        return queues

    async def _run_engine(self) -> None:
        """Decodes rounds while batches wait: each round takes whole waiting batches, oldest first."""
        while self.waiting:
            round_: list[tuple[_Prepared, asyncio.Queue]] = []
            while self.waiting and (not round_ or len(round_) + len(self.waiting[0]) <= self.cfg.max_batch_size):
                round_.extend(self.waiting.popleft())
            try:
                await self._run_round(round_)  # every request's stream ends with its finishing event and a None
            except Exception as err:  # each unfinished request gets it as an error event
                for _, queue in round_:
                    queue.put_nowait(err)

    async def _run_round(self, round_: list[tuple[_Prepared, asyncio.Queue]]) -> None:
        """One round: group the requests by ``group_key`` and step every group until all are done."""
        items = [item for item, _ in round_]
        groups: dict[tuple, list[int]] = {}
        for r, item in enumerate(items):
            groups.setdefault(item.group_key(), []).append(r)
        loop = asyncio.get_running_loop()

        def start() -> list[tuple[_Group, list[int]]]:
            return [(_Group(self.models[items[idx[0]].job.model], [items[r] for r in idx], self.device), idx)
                    for idx in groups.values()]

        running = await loop.run_in_executor(self.pool, start)
        for _, idx in running:
            self.batch_sizes[len(idx)] += 1
        while running:
            results = await loop.run_in_executor(self.pool, lambda now=running: [g.step() for g, _ in now])
            for (group, idx), group_events in zip(running, results):
                for r, event in zip(idx, group_events):
                    if event is not StopIteration:
                        round_[r][1].put_nowait(event)
                        if event["finish_reason"] is not None:
                            round_[r][1].put_nowait(None)
                if group.new_tokens:
                    model_id = items[idx[0]].job.model
                    self.generated[model_id] += group.new_tokens
                    self.generated_metric.inc(group.new_tokens, tags={"model": model_id})
            running = [(g, idx) for g, idx in running if not g.done]


# --- ingress ------------------------------------------------------------------------------------------------

api = FastAPI(title="crosslayer", description="OpenAI-compatible chat completions over CLI adapters",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("crosslayer: unhandled error")
    return ApiError.internal(exc).response()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# Everything the ingress methods use must be defined or imported above: @serve.ingress pickles the FastAPI app
# (and so these methods, by value) while the class statement runs.
@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: auth, limits, parsing, image decoding; forwards a ChatJob to VLMModel and formats answers."""

    def __init__(self, config: ServeConfig, model: Any):
        from ray.util import metrics

        self.cfg, self.model = config, model
        self.models = config.model_ids
        self.api_key = config.read_api_key()
        if self.api_key is None and config.require_api_key:  # fail closed, e.g. env var missing on the cluster
            raise RuntimeError(f"require_api_key is set but no key was found in ${config.api_key_env} or "
                               f"api_key_file={config.api_key_file}")
        self.created = int(time.time())
        self.tally: Counter[str] = Counter()  # this replica's "requests", "rejected" and "rejected:<reason>"
        self.requests_metric = metrics.Counter("crosslayer_requests_total", tag_keys=("model", "status"),
                                               description="Chat completion requests, by model and HTTP status.")
        self.rejected_metric = metrics.Counter("crosslayer_rejected_requests_total", tag_keys=("model", "reason"),
                                               description="Requests refused (4xx: auth, limits, bad input; "
                                                           "503 overloaded), by model and error code.")

    def _rejected(self, model: str, response: JSONResponse) -> JSONResponse:
        """Count an error answer as a rejection when it is the client's (4xx) or capacity's (503 overloaded)."""
        status = response.status_code
        reason = "http_error"
        try:
            reason = json.loads(response.body)["error"]["code"] or ApiError.TYPES.get(status, "invalid_request")
        except (ValueError, KeyError, TypeError):
            pass
        if 400 <= status < 500 or reason == "overloaded":
            self.tally["rejected"] += 1
            self.tally[f"rejected:{reason}"] += 1
            self.rejected_metric.inc(tags={"model": model, "reason": reason})
        return response

    def _answered(self, model: str, response: Any) -> Any:
        """Count one chat completion request by its status (and as a rejection where it is one)."""
        status = getattr(response, "status_code", 200)
        self.tally["requests"] += 1
        self.requests_metric.inc(tags={"model": model, "status": str(status)})
        return self._rejected(model, response) if status >= 400 else response

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key; send Authorization: Bearer <key>",
                           code="invalid_api_key")

    @api.get("/healthz")
    async def healthz(self) -> Any:
        try:
            stats = await asyncio.wait_for(self.model.stats.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 (any failure means: not healthy)
            return JSONResponse({"status": "unavailable", "reason": type(err).__name__}, status_code=503)
        tally = self.tally
        return {"status": "ok", "batch_sizes": stats["batch_sizes"], "max_batch_size": stats["max_batch_size"],
                "requests": tally["requests"], "rejected": tally["rejected"],
                "rejected_by_reason": {k.split(":", 1)[1]: v for k, v in sorted(tally.items())
                                       if k.startswith("rejected:")},
                "generated_tokens": sum(stats.get("generated_tokens", {}).values())}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Any:
        try:
            self._auth(request)
        except ApiError as err:
            return self._rejected("unknown", err.response())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created,
                                            "owned_by": "crosslayer"} for m in self.models]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        model, response = await self._chat(request)
        return self._answered(model, response)

    async def _chat(self, request: Request) -> tuple[str, Any]:
        """-> (served model id, or "unknown" before the request names one; the answer)."""
        model = "unknown"
        try:
            self._auth(request)
            body = await read_json(request, self.cfg.max_body_bytes)
            job, options = await asyncio.to_thread(parse_chat_request, body, self.cfg, self.models)
            model = job.model
            events = self.model.options(stream=True).stream.remote(job)
            first = await events.__anext__()
            if "error" in first:
                return model, ApiError.event_response(first)
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": job.model}
            if options.stream:
                return model, StreamingResponse(self._chunks(events, meta, first["prompt_tokens"], options),
                                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return model, await self._complete(events, meta, first["prompt_tokens"])
        except ApiError as err:
            return model, err.response()
        except Exception as err:
            from ray.serve.exceptions import BackPressureError

            if isinstance(err, BackPressureError):
                return model, ApiError(503, "server is at capacity; retry later", code="overloaded").response()
            logger.exception("crosslayer: chat completion failed")
            return model, ApiError.internal(err).response()

    async def _complete(self, events: Any, meta: dict, prompt_tokens: int) -> JSONResponse:
        text, last = [], {}
        async for event in events:
            if "error" in event:
                return ApiError.event_response(event)
            text.append(event["delta"])
            last = event
        body = {**meta, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": last.get("finish_reason", "length")}],
                "usage": _usage(prompt_tokens, last.get("completion_tokens", 0))}
        if "gates" in last:
            body["gates"] = last["gates"]
        return JSONResponse(body, headers={"x-batch-size": str(last.get("batch_size", 1))})

    async def _chunks(self, events: Any, meta: dict, prompt_tokens: int,
                      options: StreamOptions) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            return _sse({**meta, "object": "chat.completion.chunk", **extra,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        completion = 0
        try:
            async for event in events:
                if "error" in event:
                    yield _sse({"error": event["error"]})
                    break
                completion = event["completion_tokens"]
                if event["delta"]:
                    yield chunk({"content": event["delta"]})
                if event["finish_reason"]:
                    extra = {"gates": event["gates"]} if "gates" in event else {}
                    yield chunk({}, event["finish_reason"], **extra)
            if options.include_usage:
                yield _sse({**meta, "object": "chat.completion.chunk", "choices": [],
                            "usage": _usage(prompt_tokens, completion)})
        except Exception as err:  # the status line is gone: report in-band
            logger.exception("crosslayer: streaming failed")
            yield _sse(ApiError.internal(err, during="streaming").body())
        yield _sse("[DONE]")


# --- application and command --------------------------------------------------------------------------------

def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application: OpenAIIngress -> VLMModel, options from the config (a Serve config's
    ``deployments[]`` entries override them)."""
    cfg = cfg.resolved()
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    gpus = cfg.gpus()
    if gpus > 0:
        actor["num_gpus"] = gpus
    model = VLMModel.options(
        max_ongoing_requests=cfg.max_ongoing_requests, ray_actor_options=actor,
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
    ).bind(cfg)
    ingress = OpenAIIngress.options(num_replicas=cfg.ingress_replicas,
                                    max_ongoing_requests=max(100, cfg.max_ongoing_requests),
                                    ray_actor_options={"num_cpus": cfg.ingress_num_cpus})
    return ingress.bind(cfg, model)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path`` target for Serve configs: ``args`` are ServeConfig fields."""
    return build_app(ServeConfig.from_dict(dict(args or {})))


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    overrides = {"adapters": args.adapter or cfg.adapters, "base": args.base or cfg.base,
                 "include_base": args.include_base or cfg.include_base}
    cfg = dataclasses.replace(cfg, **overrides).resolved()
    if cfg.read_api_key() is not None:  # the replicas must find it too (env inherited locally, or api_key_file)
        cfg = dataclasses.replace(cfg, require_api_key=True)
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"crosslayer serve: warning: no API key (set ${cfg.api_key_env} or api_key_file); anyone who can "
              f"reach {args.host}:{args.port} can use the API", file=sys.stderr)
    app = build_app(cfg)
    if not ray.is_initialized():
        ray.init()
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="crosslayer", route_prefix="/")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"crosslayer serve: http://{args.host}:{args.port}/v1 models {cfg.model_ids}, "
              f"API key {'required' if cfg.require_api_key else 'off'} (Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("crosslayer serve: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve adapters over an OpenAI-compatible API on Ray Serve")
    p.add_argument("--adapter", action="append", metavar="[ID=]DIR",
                   help="adapter folder, repeatable; the model id is the folder name unless ID= is given")
    p.add_argument("--base", help="base preset, hub id, folder or s3:// prefix (default: the adapters' base)")
    p.add_argument("--include-base", action="store_true", help="also serve the bare base under its name")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--config", help="YAML of ServeConfig fields, or a Serve config (first application's args)")
    p.set_defaults(func=cmd_serve)
