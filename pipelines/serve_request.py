"""Request parsing for ``POST /v1/chat/completions``: a body -> a ``ChatJob`` within the limits, or an ``ApiError``
(4xx) that names the field. Nothing a client sends may end as a 5xx.

Every top-level field is either honoured or refused with a 400 naming it; none is silently ignored:
  honoured   model, messages, max_tokens / max_completion_tokens, n, temperature, top_p, seed, stop, stream,
             stream_options.include_usage, logprobs, top_logprobs, presence_penalty, frequency_penalty,
             logit_bias; vLLM's top_k, min_p, repetition_penalty, min_tokens; ours: return_gates
  no-ops     fields whose value asks for nothing beyond plain text: response_format {"type": "text"},
             tools [] / tool_choice "none" / parallel_tool_calls, functions [] / function_call "none",
             modalities ["text"], store false, service_tier "auto"/"default", and the identifiers user,
             safety_identifier, prompt_cache_key and metadata (they do not change the answer)
  refused    anything else, and the no-op fields at any other value (json mode, tools, audio, ...)
Numbers follow OpenAI's types: integer fields refuse floats (``max_tokens: 5.0``), and NaN/Infinity are refused.
Messages: roles system/developer/user/assistant; content a string or a non-empty list of text and image_url
parts (``content: null`` and ``text: null`` are refused, as OpenAI does); images only in user messages.
Images themselves are loaded by ``pipelines.serve_images``; this module returns their URLs.
"""

import json
import math
from typing import Any

from fastapi import Request

from .serve_api import IMAGE, MAX_TOP_LOGPROBS, ApiError, ChatJob, SamplingParams, ServeConfig, StreamOptions

HONOURED = ("model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed", "stop",
            "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
            "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "return_gates")
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {  # field -> the values that ask for nothing this server lacks
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "parallel_tool_calls": (True, False), "modalities": (["text"],), "store": (False,),
    "service_tier": ("auto", "default")}
IDENTIFIERS = ("user", "safety_identifier", "prompt_cache_key")  # free strings that do not change the answer
MESSAGE_KEYS = ("role", "content")
MESSAGE_NULL_KEYS = ("name", "refusal", "tool_calls", "function_call", "audio", "annotations")  # accepted when null
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes of body (413 above, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, over max_body_bytes={limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over max_body_bytes={limit}", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict[str, Any]:
    """One JSON object (400 otherwise: bad syntax, bad UTF-8, nesting too deep for the parser)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body nests too deeply to parse", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, default: Any, lo: float, hi: float, kind: type = float) -> Any:
    """A finite number in [lo, hi]; ``kind=int`` refuses anything but a JSON integer (as OpenAI's API does)."""
    value = body.get(name)
    if value is None:
        return default
    integer = kind is int
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {what}, got {_show(value)}", param=name, code="invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value}", param=name, code="invalid_value")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}={value} is out of range [{lo}, {hi}]", param=name, code="invalid_value")
    return kind(value)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_show(value)}", param=name, code="invalid_type")
    return value


def _show(value: Any, limit: int = 60) -> str:
    """A short repr of a client value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: str, where: str) -> str:
    """Refuse strings that are not valid Unicode (lone surrogates cannot be tokenised or encoded)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where} is not valid Unicode (lone surrogate)", param=where,
                       code="invalid_value") from None
    return value


def _check_fields(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in HONOURED or value is None:
            continue
        if name in IDENTIFIERS:
            if not isinstance(value, str) or len(value) > 512:
                raise ApiError(400, f"{name} must be a string of at most 512 characters", param=name)
            _text(value, name)
        elif name == "metadata":
            if not isinstance(value, dict) or len(value) > 16 or not all(
                    isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                    for k, v in value.items()):
                raise ApiError(400, "metadata must map at most 16 keys to strings", param="metadata")
        elif name in NO_OP_VALUES:
            if not any(type(value) is type(v) and value == v for v in NO_OP_VALUES[name]):
                allowed = " or ".join(json.dumps(v) for v in NO_OP_VALUES[name])
                raise ApiError(400, f"{name}={_show(value)} is not supported by this server (only {allowed}); "
                                    f"it generates plain text without tools", param=name,
                               code="unsupported_parameter")
        else:
            raise ApiError(400, f"{_show(name)} is not a supported parameter; supported: "
                                f"{', '.join(HONOURED)} (and as no-ops: {', '.join([*NO_OP_VALUES, *IDENTIFIERS])}, "
                                f"metadata)", param=name[:100], code="unsupported_parameter")


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers", param="logit_bias")
    out = {}
    for key in raw:
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise ApiError(400, f"logit_bias keys must be token ids (decimal strings), got {_show(key)}",
                           param="logit_bias", code="invalid_value")
        try:
            out[int(key)] = _number(raw, key, 0.0, -100.0, 100.0)
        except ApiError as err:
            raise ApiError(400, f"logit_bias: {err.message}", param="logit_bias", code=err.code) from None
    return out


def parse_chat_request(body: dict[str, Any], cfg: ServeConfig,
                       models: list[str]) -> tuple[ChatJob, StreamOptions, list[str]]:
    """Validate an OpenAI chat completion body against the limits -> (job without images, options, image URLs)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (see GET /v1/models)", param="model")
    if model not in models:
        raise ApiError(404, f"model {_show(model)} does not exist; available: {models}", param="model",
                       code="model_not_found")
    _check_fields(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    raw = body.get(name)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > cfg.max_tokens:
        raise ApiError(400, f"{name}={raw} exceeds this server's limit max_tokens={cfg.max_tokens}", param=name,
                       code="max_tokens_exceeded")
    max_tokens = _number(body, name, cfg.default_max_tokens, 1, cfg.max_tokens, int)
    n = _number(body, "n", 1, 1, cfg.max_batch_size, int)
    stream, return_gates, logprobs = _flag(body, "stream"), _flag(body, "return_gates"), _flag(body, "logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, int)
    if body.get("top_logprobs") is not None and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if return_gates and n > 1:
        raise ApiError(400, f"return_gates takes one choice; got n={n}", param="n")
    top_k = _number(body, "top_k", 0, -1, 2**31 - 1, int)
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        top_k=max(top_k, 0), min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, int),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 10.0),
        logit_bias=_logit_bias(body), min_tokens=_number(body, "min_tokens", 0, 0, max_tokens, int),
        logprobs=logprobs, top_logprobs=top_logprobs)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > cfg.max_stop:
        raise ApiError(400, f"stop must be a string or a list of at most {cfg.max_stop} non-empty strings",
                       param="stop")
    stop = [_text(s, "stop") for s in stop]
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options must be an object with at most include_usage",
                           param="stream_options")
    include_usage = _flag(options or {}, "include_usage")
    messages, urls = _parse_messages(body.get("messages"))
    chars = sum(len(m["content"]) for m in messages)
    if chars > cfg.prompt_char_limit:
        raise ApiError(400, f"messages hold {chars} characters of text, over this server's limit of "
                            f"{cfg.prompt_char_limit}", param="messages", code="context_length_exceeded")
    if len(urls) > cfg.max_images:
        raise ApiError(400, f"request has {len(urls)} images, over max_images={cfg.max_images}", param="messages",
                       code="too_many_images")
    job = ChatJob(model=model, messages=messages, images=[], max_tokens=max_tokens, stop=stop, sampling=sampling,
                  n=n, return_gates=return_gates)
    return job, StreamOptions(stream=stream, include_usage=include_usage), urls


def _parse_messages(messages: Any) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI messages -> [{"role", "content"}] with "<image>\\n" where each image part was, and the image URLs."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, developer, user or assistant, got {_show(role)}",
                           param=f"{where}.role")
        for key, value in message.items():
            if key not in MESSAGE_KEYS and (key not in MESSAGE_NULL_KEYS or value is not None):
                raise ApiError(400, f"{where}.{_show(key, 40)} is not supported (only role and content)",
                               param=f"{where}.{key[:40]}", code="unsupported_parameter")
        content = message.get("content")
        if isinstance(content, str):
            parts: list[Any] = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = content
        else:
            raise ApiError(400, f"{where}.content must be a string or a non-empty list of content parts, got "
                                f"{_show(content)}", param=f"{where}.content")
        text = []
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                value = part.get("text")
                if not isinstance(value, str):
                    raise ApiError(400, f"{at}.text must be a string, got {_show(value)}", param=f"{at}.text")
                if IMAGE in value:
                    raise ApiError(400, f"{at}: text may not contain the image placeholder {IMAGE}; send the "
                                        f"image as an image_url part", param=at)
                extra = set(part) - {"type", "text"}
            elif kind == "image_url" and role == "user":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise ApiError(400, f"{at}.image_url.url must be a string", param=f"{at}.image_url.url")
                if isinstance(ref, dict) and (set(ref) - {"url", "detail"} or ref.get("detail") not in (None, "auto")):
                    raise ApiError(400, f"{at}.image_url: only url and detail \"auto\" are supported",
                                   param=f"{at}.image_url", code="unsupported_parameter")
                urls.append(url)
                value = IMAGE + "\n"
                extra = set(part) - {"type", "image_url"}
            else:
                raise ApiError(400, f"{at}: unsupported part {_show(kind)}; use text parts, and image_url parts "
                                    f"in user messages", param=at)
            if extra:
                raise ApiError(400, f"{at} has unsupported keys {sorted(map(str, extra))[:5]}", param=at,
                               code="unsupported_parameter")
            text.append(_text(value, f"{at}.text"))
        out.append({"role": "system" if role == "developer" else role, "content": "".join(text)})
    return out, urls
