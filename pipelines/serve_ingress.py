"""The HTTP front: ``OpenAIIngress``, a FastAPI app on Ray Serve, speaking OpenAI's chat completions API.

  POST /v1/chat/completions   auth -> body (size-capped) -> JSON and field checks (``serve_request``, on the parse
                              pool) -> images (``serve_images``: fetches on their own pool, decoding on the parse
                              pool) -> VLMModel.generate (a stream of events) -> one JSON body, or server-sent
                              events ending in ``data: [DONE]``
  GET /v1/models, GET /v1/models/{id}, GET /healthz, GET /metrics (Prometheus text, ``serve_metrics``)
  GET /, GET /playground/{file}  the web playground (``pipelines.playground``), unless ServeConfig.playground is off

Every client error is a 4xx ``ApiError`` naming the field; a 5xx means the server failed. A client that goes away
(streaming or not) cancels its model stream, which frees its rows at the next decode step; that is logged at
INFO, not as an error. No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real
types through Serve's ingress wrapper.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import playground
from .serve_api import ApiError, ChatJob, Delta, End, Event, ServeConfig, Started, StreamOptions
from .serve_images import ImageLoader
from .serve_metrics import IngressMetrics, RequestTrack
from .serve_request import parse_chat_request, parse_json, read_body

logger = logging.getLogger("ray.serve")

api = FastAPI(title="crosslayer", description="OpenAI-compatible chat completions over CLI adapters",
              docs_url=None, redoc_url=None, openapi_url=None)


def _cancelled(err: BaseException) -> bool:
    """Whether ``err`` says the request was cancelled (its client went away), not that something failed."""
    from ray.exceptions import TaskCancelledError

    return isinstance(err, (asyncio.CancelledError, TaskCancelledError))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> Response:
    if _cancelled(exc):  # e.g. a streaming response's disconnect listener, when Serve cancels the request
        logger.info("crosslayer: client went away (%s %s)", request.method, request.url.path)
        return Response(status_code=499)
    logger.exception("crosslayer: unhandled error")
    return ApiError.internal(exc).response()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _abandoned(stream: Any, track: RequestTrack) -> None:
    """A streaming body was dropped: if it never ran to its end, free the model's rows and settle the gauges."""
    if not track.closed:
        stream.cancel()
        track.close(cancelled=True)


async def _events(stream: Any) -> AsyncIterator[Event]:
    """The model stream's events one by one (it yields them in batches)."""
    async for batch in stream:
        for event in batch:
            yield event


@dataclasses.dataclass
class _Choice:
    """One choice's answer as it accumulates (non-streaming)."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


# Everything the ingress methods use must be defined or imported above: @serve.ingress pickles the FastAPI app
# (and so these methods, by value) while the class statement runs.
@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: auth, limits, parsing, images; forwards a ChatJob to VLMModel and formats its events."""

    def __init__(self, config: ServeConfig, model: Any):
        from PIL import Image

        self.cfg, self.model = config, model
        self.models = config.model_ids
        self.api_key = config.read_api_key()
        if self.api_key is None and config.require_api_key:  # fail closed, e.g. env var missing on the cluster
            raise RuntimeError(f"require_api_key is set but no key was found in ${config.api_key_env} or "
                               f"api_key_file={config.api_key_file}")
        self.created = int(time.time())
        self.metrics = IngressMetrics()
        self.parse_pool = ThreadPoolExecutor(config.ingress_workers, thread_name_prefix="crosslayer-parse")
        self.images = ImageLoader(config, self.parse_pool)
        # Pillow warns before this server's own pixel check answers 413 (ServeConfig keeps the limits in order)
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    # --- helpers ----------------------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key; send Authorization: Bearer <key>",
                           code="invalid_api_key")

    def _error(self, model: str, err: ApiError) -> JSONResponse:
        """The answer for ``err``, counted as a rejection when it is the client's (4xx) or capacity's (503)."""
        if 400 <= err.status < 500 or err.code == "overloaded":
            self.metrics.rejected_as(model, err.code or ApiError.TYPES.get(err.status, "invalid_request"))
        return err.response()

    def _model_card(self, ident: str) -> dict[str, Any]:
        return {"id": ident, "object": "model", "created": self.created, "owned_by": "crosslayer"}

    # --- routes -----------------------------------------------------------------------------------------------

    @api.get("/")
    async def playground_page(self, request: Request) -> Response:
        return playground.page(request, self.cfg, self.api_key)

    @api.get("/playground/{name:path}")
    async def playground_file(self, name: str, request: Request) -> Response:
        return playground.asset(name, request, self.cfg, self.api_key)

    @api.get("/healthz")
    async def healthz(self) -> Any:
        try:
            stats = await asyncio.wait_for(self.model.stats.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 (any failure means: not healthy)
            return JSONResponse({"status": "unavailable", "reason": type(err).__name__}, status_code=503)
        tally = self.metrics.tally
        return {"status": "ok", "batch_sizes": stats["batch_sizes"], "max_batch_size": stats["max_batch_size"],
                "running_rows": stats["running_rows"], "queued_requests": stats["queued_requests"],
                "kv_reserved_bytes": stats["kv_reserved_bytes"], "kv_total_bytes": stats["kv_total_bytes"],
                "requests": tally["requests"], "rejected": tally["rejected"], "cancelled": tally["cancelled"],
                "rejected_by_reason": {k.split(":", 1)[1]: v for k, v in sorted(tally.items())
                                       if k.startswith("rejected:")},
                "generated_tokens": sum(stats.get("generated_tokens", {}).values())}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Any:
        try:
            self._auth(request)
        except ApiError as err:
            return self._error("unknown", err)
        text, content_type = self.metrics.render()
        return Response(content=text, media_type=content_type)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Any:
        try:
            self._auth(request)
        except ApiError as err:
            return self._error("unknown", err)
        return {"object": "list", "data": [self._model_card(m) for m in self.models]}

    @api.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str, request: Request) -> Any:
        try:
            self._auth(request)
            if model_id not in self.models:
                raise ApiError(404, f"model {model_id!r} does not exist; available: {self.models}", param="model",
                               code="model_not_found")
        except ApiError as err:
            return self._error("unknown", err)
        return self._model_card(model_id)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        arrived = time.monotonic()
        model, track = "unknown", None
        try:
            self._auth(request)
            raw = await read_body(request, self.cfg.max_body_bytes)
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.parse_pool, parse_json, raw)
            job, options, urls = await loop.run_in_executor(self.parse_pool, parse_chat_request, body, self.cfg,
                                                            self.models)
            model = job.model
            if urls:
                job = dataclasses.replace(job, images=await self.images.load(urls))
            stream = self.model.options(stream=True).generate.remote(job)
            track = self.metrics.track(model, job.n, arrived)
            response = await self._answer(stream, job, options, track)
        except ApiError as err:
            response = self._error(model, err)
        except Exception as err:  # noqa: BLE001 (a failure of this server, never of the client's input)
            if _cancelled(err):
                return self._gone(model, track)
            from ray.serve.exceptions import BackPressureError

            if isinstance(err, BackPressureError):
                response = self._error(model, ApiError(503, "server is at capacity; retry later", code="overloaded"))
            else:
                logger.exception("crosslayer: chat completion failed")
                response = ApiError.internal(err).response()
        except asyncio.CancelledError:
            self._gone(model, track)
            raise
        if track is not None and not isinstance(response, StreamingResponse):
            track.close()
        self.metrics.answered(model, response.status_code)
        return response

    def _gone(self, model: str, track: RequestTrack | None) -> Response:
        """The client went away before an answer: counted as status 499 (client closed request) and cancelled."""
        logger.info("crosslayer: client went away before the answer (model %s)", model)
        if track is not None:
            track.close(cancelled=True)
        self.metrics.answered(model, 499)
        return Response(status_code=499)

    async def _answer(self, stream: Any, job: ChatJob, options: StreamOptions, track: RequestTrack) -> Response:
        events = _events(stream)
        try:
            first = await events.__anext__()
        except BaseException:
            stream.cancel()
            raise
        if isinstance(first, End):
            raise first.error or ApiError(500, "the model ended the request without an answer")
        if not isinstance(first, Started):
            raise ApiError(500, f"the model sent {type(first).__name__} first")
        track.started(first.prompt_tokens)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": job.model}
        if options.stream:
            chunks = self._chunks(stream, events, meta, job, first.prompt_tokens, options, track)
            weakref.finalize(chunks, _abandoned, stream, track)  # a body never iterated (client gone at once)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(stream, events, meta, job, first.prompt_tokens, track)

    async def _complete(self, stream: Any, events: AsyncIterator[Event], meta: dict, job: ChatJob,
                        prompt_tokens: int, track: RequestTrack) -> JSONResponse:
        choices = [_Choice() for _ in range(job.n)]
        rows, gates, ended = 1, None, False
        try:
            async for event in events:
                if isinstance(event, End):
                    ended = True
                    if event.error is not None:
                        raise event.error
                    break
                if isinstance(event, Delta):
                    track.delta(event)
                    choice = choices[event.index]
                    choice.text.append(event.text)
                    choice.logprobs += event.logprobs or []
                    choice.tokens, choice.finish_reason = event.tokens, event.finish_reason or choice.finish_reason
                    rows, gates = max(rows, event.rows), event.gates or gates
        finally:
            if not ended:
                stream.cancel()
        if not ended:
            raise ApiError(500, "the model stream ended without its last event")
        body = {**meta, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                             "logprobs": {"content": c.logprobs, "refusal": None} if job.sampling.logprobs else None,
                             "finish_reason": c.finish_reason or "length"} for i, c in enumerate(choices)],
                "usage": _usage(prompt_tokens, sum(c.tokens for c in choices))}
        if gates is not None:
            body["gates"] = gates
        return JSONResponse(body, headers={"x-batch-size": str(rows)})

    async def _chunks(self, stream: Any, events: AsyncIterator[Event], meta: dict, job: ChatJob, prompt_tokens: int,
                      options: StreamOptions, track: RequestTrack) -> AsyncIterator[str]:
        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None,
                  **extra: Any) -> str:
            lp = {"content": logprobs, "refusal": None} if logprobs else None
            return _sse({**meta, "object": "chat.completion.chunk", **extra,
                         "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

        tokens, ended = [0] * job.n, False
        try:
            for i in range(job.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for event in events:
                if isinstance(event, End):
                    ended = True
                    if event.error is not None:
                        yield _sse(event.error.body())
                        yield _sse("[DONE]")
                        return
                    break
                if not isinstance(event, Delta):
                    continue
                track.delta(event)
                tokens[event.index] = event.tokens
                if event.text or event.logprobs:
                    yield chunk(event.index, {"content": event.text}, logprobs=event.logprobs)
                if event.finish_reason:
                    extra = {"gates": event.gates} if event.gates is not None else {}
                    yield chunk(event.index, {}, event.finish_reason, **extra)
            if options.include_usage:
                yield _sse({**meta, "object": "chat.completion.chunk", "choices": [],
                            "usage": _usage(prompt_tokens, sum(tokens))})
            yield _sse("[DONE]")
        except (Exception, asyncio.CancelledError, GeneratorExit) as err:  # the status line is gone: in-band
            if _cancelled(err) or isinstance(err, GeneratorExit):
                logger.info("crosslayer: streaming client went away (model %s)", job.model)
                ended = True
                track.close(cancelled=True)
                stream.cancel()
                if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
                    raise
                return
            logger.exception("crosslayer: streaming failed")
            yield _sse(ApiError.internal(err, during="streaming").body())
            yield _sse("[DONE]")
        finally:
            if not ended:
                stream.cancel()
            track.close()
