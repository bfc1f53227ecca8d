"""Online serving: an OpenAI-compatible chat API over CLI adapters on Ray Serve (``crosslayer serve``).

One Serve application, two deployments:
  HTTP ──> OpenAIIngress (FastAPI: auth, body/image/token limits, image decoding, SSE)
              │ DeploymentHandle, one streamed call per request
              ▼
           VLMModel (one base, loaded once, + every adapter over it; @serve.batch groups concurrent requests,
                     generation uses the KV cache and AGF's per-image keys/values; autoscaled)
Routes: ``POST /v1/chat/completions`` (text + ``image_url`` parts, ``data:`` base64 URLs, ``stream: true`` as
server-sent events ending in ``data: [DONE]``, ``usage``; ``"return_gates": true`` adds the AGF gates per
generated token, injection layer and vision layer), ``GET /v1/models``, ``GET /healthz`` (batch sizes seen).
Every limit lives in ``ServeConfig``; errors are OpenAI-style ``{"error": {message, type, param, code}}``.
``app_builder`` is the ``import_path`` target of ``cluster/serve/config.yaml`` (``serve run`` / ``serve deploy``).
Torch is imported inside the model deployment only, so ingress replicas stay light. No ``from __future__ import
annotations`` here: FastAPI must see the route parameters' real types through Serve's ingress wrapper.
"""

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")
IMAGE = "<image>"  # placeholder the ingress puts where an image part was (cli_module.prompting.IMAGE)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # decoders an uploaded image may use
DTYPES = ("float32", "bfloat16", "float16")


# --- configuration ----------------------------------------------------------------------------------------

@dataclass
class ServeConfig:
    """Everything ``crosslayer serve`` / ``app_builder`` accept; safe defaults, checked eagerly."""

    base: str | None = None  # preset, hub id, folder or s3:// prefix; None: the adapters' base ("tiny" without)
    adapters: list[str] = field(default_factory=list)  # adapter folders, "DIR" or "ID=DIR" (id: the folder name)
    include_base: bool = False  # also serve the bare base (one_to_one) under its name; always so without adapters
    dtype: str = "float32"  # weights dtype in the model replicas: float32, bfloat16 or float16
    api_key_env: str | None = "CROSSLAYER_API_KEY"  # env var holding the API key (unset or empty: no key from it)
    api_key_file: str | None = None  # file holding the API key (wins over the env var); no key at all: open API
    require_api_key: bool = False  # ingress refuses to start without a key (crosslayer serve sets it if it sees one)
    max_body_bytes: int = 8 * 2**20  # largest request body (413 above)
    max_image_bytes: int = 4 * 2**20  # largest encoded image, data: URL or fetched (413 above)
    max_image_pixels: int = 4096 * 4096  # largest width x height, checked before decoding (decompression bombs)
    max_images: int = 1  # images per request; the model takes one <image> per prompt, so 0 or 1
    max_prompt_tokens: int = 4096  # prompt tokens fed to the model, image tokens included (400 above)
    max_tokens: int = 512  # cap on a request's max_tokens / max_completion_tokens (400 above)
    default_max_tokens: int = 128  # max_tokens when the request gives none
    max_stop: int = 4  # stop sequences per request
    image_url_allowlist: list[str] = field(default_factory=list)  # hosts http(s) image URLs may name ("*.x.org" ok)
    allow_private_image_hosts: bool = False  # let allowlisted hosts resolve to loopback/private/link-local addresses
    image_fetch_timeout_s: float = 5.0  # timeout of one http(s) image fetch
    max_batch_size: int = 8  # @serve.batch: most requests decoded together in one replica
    batch_wait_timeout_s: float = 0.05  # @serve.batch: how long a batch waits to fill up
    max_ongoing_requests: int = 32  # per model replica; must be >= max_batch_size or batches stay small
    min_replicas: int = 1  # autoscaling floor of model replicas
    max_replicas: int = 1  # autoscaling ceiling of model replicas
    target_ongoing_requests: float = 4.0  # autoscaling target per model replica
    num_cpus: float = 1.0  # CPUs reserved per model replica
    num_gpus: float | None = None  # GPUs per model replica; None: 1 if the driver sees CUDA, else 0
    ingress_replicas: int = 1  # OpenAIIngress replicas
    ingress_num_cpus: float = 0.5  # CPUs reserved per ingress replica

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str):
            self.adapters = [self.adapters]
        self.adapters = [a if isinstance(a, str) else f"{a['id']}={a['path']}" for a in self.adapters]
        self.image_url_allowlist = [h.lower() for h in self.image_url_allowlist]
        for f in dataclasses.fields(self):  # YAML can hand over strings: check the numbers' types first
            value = getattr(self, f.name)
            if f.type in (int, float, float | None) and value is not None and (
                    isinstance(value, bool) or not isinstance(value, int if f.type is int else (int, float))):
                raise ValueError(f"{f.name} must be {'an integer' if f.type is int else 'a number'}, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        positive = ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_tokens",
                    "default_max_tokens", "max_batch_size", "max_ongoing_requests", "max_replicas",
                    "ingress_replicas", "image_fetch_timeout_s", "target_ongoing_requests")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_stop", "min_replicas", "batch_wait_timeout_s", "num_cpus", "ingress_num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or null (auto), got {self.num_gpus}")
        if not 0 <= self.max_images <= 1:
            raise ValueError(f"max_images={self.max_images}: the model takes one <image> per prompt; use 0 or 1")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens={self.max_tokens}")
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError(f"max_image_bytes={self.max_image_bytes} exceeds max_body_bytes={self.max_body_bytes}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch_size="
                             f"{self.max_batch_size}; Serve caps a batch at max_ongoing_requests, raise it")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        for host in self.image_url_allowlist:
            if "/" in host or ":" in host.strip("[]") and not _is_ip(host.strip("[]")):
                raise ValueError(f"image_url_allowlist entry {host!r} must be a bare host name, not a URL")
        ids = [i for i, _ in self.model_specs()]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"model ids {dup} are used twice; name adapters with ID=DIR")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown serve config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ServeConfig":
        """A mapping of ServeConfig fields, or a Serve config whose first application's ``args`` holds them."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")  # noqa: TRY004 (the CLI reports it)
        if "applications" in data:
            apps = data["applications"] or [{}]
            data = apps[0].get("args") or {}
        return cls.from_dict(data)

    @property
    def base_id(self) -> str:
        """The model id the bare base is served under: the preset or hub id, or a folder's name."""
        name = self.base or "tiny"
        return name if name.count("/") <= 1 and not os.path.isdir(name) else Path(name.rstrip("/")).name

    def model_specs(self) -> list[tuple[str, str | None]]:
        """(model id, adapter folder or None for the bare base), in the order /v1/models lists them."""
        specs: list[tuple[str, str | None]] = [(self.base_id, None)] if self.include_base or not self.adapters else []
        for entry in self.adapters:
            ident, sep, path = entry.partition("=")
            specs.append((ident, path) if sep and ident else (Path(entry.rstrip("/")).name, entry))
        return specs

    def resolved(self) -> "ServeConfig":
        """A copy with ``base`` filled in from the adapters' configs (they must agree) when it was not given."""
        if self.base is not None:
            return self
        from cli_module.adapter import read_adapter_config

        bases = {read_adapter_config(p)["base_model"]: p for _, p in self.model_specs() if p is not None}
        if len(bases) > 1:
            raise ValueError(f"adapters name different bases {sorted(bases)}; serve them separately or pass --base")
        return dataclasses.replace(self, base=next(iter(bases), "tiny"))

    def read_api_key(self) -> str | None:
        if self.api_key_file:
            key = Path(self.api_key_file).read_text().strip()
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} is empty")
            return key
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def gpus(self) -> float:
        """GPUs to reserve per model replica: as configured, else 1 when this (driver) process sees CUDA."""
        if self.num_gpus is not None:
            return self.num_gpus
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# --- errors and request parsing (ingress side) --------------------------------------------------------------

class ApiError(Exception):
    """An OpenAI-style error: HTTP status plus {"message", "type", "param", "code"}."""

    TYPES: ClassVar[dict[int, str]] = {401: "authentication_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def event(self) -> dict[str, Any]:
        return {**self.body(), "status": self.status}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class ChatJob:
    """What the ingress hands the model deployment: a validated request with decoded images."""

    model: str  # model id (adapter or base)
    messages: list[dict[str, str]]  # {"role", "content"}; each image part became "<image>\n" in its message
    images: list[Any]  # PIL RGB images, in order of their placeholders (0 or 1)
    max_tokens: int  # new tokens at most
    temperature: float  # 0 = greedy
    top_p: float  # nucleus sampling mass
    seed: int | None  # sampling seed
    stop: list[str]  # stop sequences (not part of the answer)
    return_gates: bool  # add the AGF gate summary to the final event


@dataclass
class StreamOptions:
    stream: bool  # answer as server-sent events
    include_usage: bool  # stream_options.include_usage: a last chunk holding usage


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read at most ``limit`` bytes (413 above, whatever Content-Length says), then parse one JSON object."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, over max_body_bytes={limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over max_body_bytes={limit}", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        what = "an integer" if kind is int else "a number"
        raise ApiError(400, f"{name} must be {what}, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}={value} is out of range [{lo}, {hi}]", param=name, code="invalid_value")
    return kind(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def parse_chat_request(body: dict[str, Any], cfg: ServeConfig, models: list[str]) -> tuple[ChatJob, StreamOptions]:
    """Validate an OpenAI chat completion body against the limits and decode its images (blocking I/O)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (see GET /v1/models)", param="model")
    if model not in models:
        raise ApiError(404, f"model {model!r} does not exist; available: {models}", param="model",
                       code="model_not_found")
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n={body.get('n')!r} is not supported; only n=1", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    raw = body.get(name)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > cfg.max_tokens:
        raise ApiError(400, f"{name}={raw} exceeds this server's limit max_tokens={cfg.max_tokens}", param=name,
                       code="max_tokens_exceeded")
    max_tokens = _number(body, name, cfg.default_max_tokens, 1, cfg.max_tokens, int)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > cfg.max_stop:
        raise ApiError(400, f"stop must be a string or a list of at most {cfg.max_stop} non-empty strings",
                       param="stop")
    stream, return_gates = _flag(body, "stream"), _flag(body, "return_gates")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    messages, urls = _parse_messages(body.get("messages"))
    if len(urls) > cfg.max_images:
        raise ApiError(400, f"request has {len(urls)} images, over max_images={cfg.max_images}", param="messages",
                       code="too_many_images")
    images = [load_image(url, cfg) for url in urls]
    job = ChatJob(model=model, messages=messages, images=images, max_tokens=max_tokens, temperature=temperature,
                  top_p=top_p, seed=seed, stop=stop, return_gates=return_gates)
    return job, StreamOptions(stream=stream, include_usage=bool(options.get("include_usage")))


def _parse_messages(messages: Any) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI messages -> [{"role", "content"}] with "<image>\\n" where each image part was, and the image URLs."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}",
                           param=f"messages[{i}].role")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        if not isinstance(parts, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}]")
        text = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(part.get("text"), str):
                if IMAGE in part["text"]:
                    raise ApiError(400, f"{where}: text may not contain the image placeholder {IMAGE}; send the "
                                        f"image as an image_url part", param=where)
                text.append(part["text"])
            elif kind == "image_url" and role == "user":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise ApiError(400, f"{where}.image_url.url must be a string", param=where)
                urls.append(url)
                text.append(IMAGE + "\n")
            else:
                raise ApiError(400, f"{where}: unsupported part {kind!r}; use text parts, and image_url parts "
                                    f"in user messages", param=where)
        out.append({"role": "system" if role == "developer" else role, "content": "".join(text)})
    return out, urls


def load_image(url: str, cfg: ServeConfig) -> Any:
    """A data: URL (base64) or an allowlisted http(s) URL -> a decoded PIL RGB image, within the limits."""
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, "image data URLs must look like data:image/png;base64,<data>", param="image_url",
                           code="invalid_image_url")
        data = "".join(data.split())
        if len(data) > (cfg.max_image_bytes + 2) // 3 * 4:
            raise ApiError(413, f"image is over max_image_bytes={cfg.max_image_bytes}", param="image_url",
                           code="image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"image data URL is not valid base64: {err}", param="image_url",
                           code="invalid_base64") from None
    elif url.split(":", 1)[0].lower() in ("http", "https"):
        raw = fetch_image(url, cfg)
    else:
        raise ApiError(400, "image_url must be a data: URL or an http(s) URL on the server's allowlist",
                       param="image_url", code="invalid_image_url")
    if len(raw) > cfg.max_image_bytes:
        raise ApiError(413, f"image is {len(raw)} bytes, over max_image_bytes={cfg.max_image_bytes}",
                       param="image_url", code="image_too_large")
    return decode_image(raw, cfg.max_image_pixels)


def decode_image(raw: bytes, max_pixels: int) -> Any:
    """Check format and size from the header first, then decode; anything PIL cannot read is a 400."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.format not in IMAGE_FORMATS:
                raise ApiError(400, f"image format {image.format} is not accepted; use one of {list(IMAGE_FORMATS)}",
                               param="image_url", code="invalid_image")
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, f"image is {width}x{height} = {width * height} pixels, over max_image_pixels="
                                    f"{max_pixels}", param="image_url", code="image_too_large")
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except Exception as err:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, struct.error, ...)
        raise ApiError(400, f"image data is not a decodable image ({type(err).__name__})", param="image_url",
                       code="invalid_image") from None


def host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in allowlist)


def fetch_image(url: str, cfg: ServeConfig) -> bytes:
    """Fetch an allowlisted http(s) image: public addresses only (unless allowed), no redirects, timeout, byte cap.

    The host is resolved and checked, then fetched by name; a DNS answer that changes between the two
    (rebinding) is not defended against, so keep private addresses off the allowlist."""
    import urllib.error
    import urllib.request

    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as err:
        raise ApiError(400, f"malformed image URL: {err}", param="image_url", code="invalid_image_url") from None
    if not host or not host_allowed(host, cfg.image_url_allowlist):
        raise ApiError(400, f"image URL host {host!r} is not on this server's image_url_allowlist; send the image "
                            f"inline as a data: URL", param="image_url", code="image_url_not_allowed")
    if not cfg.allow_private_image_hosts:
        try:
            infos = socket.getaddrinfo(host, port)
        except (OSError, ValueError) as err:
            raise ApiError(400, f"image URL host {host!r} does not resolve: {err}", param="image_url") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global:
                raise ApiError(400, f"image URL host {host!r} resolves to non-public address {address}",
                               param="image_url", code="image_url_not_allowed")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "crosslayer"}),
                         timeout=cfg.image_fetch_timeout_s) as response:
            raw = response.read(cfg.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ApiError(400, f"could not fetch image URL: {err}", param="image_url",
                       code="image_fetch_failed") from None
    if len(raw) > cfg.max_image_bytes:
        raise ApiError(413, f"image at URL is over max_image_bytes={cfg.max_image_bytes}", param="image_url",
                       code="image_too_large")
    return raw


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

    def step(self) -> list[Any]:
        """Decode one token for every row -> one event per row (StopIteration for rows already closed)."""
        out = next(self.steps, None)
        events = []
        for b, row in enumerate(self.rows):
            if row.closed:
                events.append(StopIteration)
                continue
            if out is None:
                row.finish = row.finish or "length"
            else:
                self._advance(row, int(out.tokens[b]), None if out.gates is None else out.gates[b])
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

    from cli_module.adapter import load_adapter, read_adapter_config
    from cli_module.bases import load_base
    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM

    dtype = getattr(torch, cfg.dtype)
    shared = load_base(cfg.base, dtype=dtype)
    models = {}
    for ident, path in cfg.model_specs():
        if path is None:
            models[ident] = FusedVLM(shared, CLIConfig(method="one_to_one"))
        else:
            own_projector = read_adapter_config(path).get("includes_projector", False)
            models[ident] = load_adapter(path, base=load_base(cfg.base, dtype=dtype) if own_projector else shared)
        models[ident].to(dtype).eval()
    return models


@serve.deployment(name="VLMModel")
class VLMModel:
    """Holds the base and its adapters; batches concurrent requests per (adapter, sampler) and streams tokens."""

    def __init__(self, config: ServeConfig):
        import ray
        import torch

        self.cfg = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray exposes only the GPUs it assigned
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)  # deployments[] may override
        torch.set_num_threads(max(1, int(cpus)))
        self.models = {k: m.to(self.device) for k, m in load_models(config).items()}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslayer-model")  # torch work, in order
        self.batch_sizes: Counter[int] = Counter()
        self.decode_batch.set_max_batch_size(config.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"models": list(self.models), "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch_size": self.cfg.max_batch_size, "device": self.device}

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
            yield ApiError(500, f"internal error while preparing the request ({type(err).__name__})").event()
            return
        yield {"prompt_tokens": item.prompt_tokens}
        try:
            async for event in self.decode_batch(item):
                yield event
        except Exception as err:
            logger.exception("crosslayer: decoding a batch failed")
            yield ApiError(500, f"internal error while generating ({type(err).__name__})").event()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # real values set from ServeConfig in __init__
    async def decode_batch(self, items: list[_Prepared]) -> AsyncIterator[list[Any]]:
        """One list per step, one event per request; groups of compatible requests step in turn."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group_key(), []).append(i)
        loop = asyncio.get_running_loop()

        def start() -> list[tuple[_Group, list[int]]]:
            return [(_Group(self.models[items[idx[0]].job.model], [items[i] for i in idx], self.device), idx)
                    for idx in groups.values()]

        running = await loop.run_in_executor(self.pool, start)
        for group, idx in running:
            self.batch_sizes[len(idx)] += 1
        while running:
            results = await loop.run_in_executor(self.pool, lambda now=running: [g.step() for g, _ in now])
            events: list[Any] = [StopIteration] * len(items)
            for (group, idx), group_events in zip(running, results):
                for i, event in zip(idx, group_events):
                    events[i] = event
            yield events
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
    return ApiError(500, f"internal error ({type(exc).__name__})").response()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# Everything the ingress methods use must be defined above: @serve.ingress pickles the FastAPI app (and so
# these methods, by value) while the class statement runs.
@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: auth, limits, parsing, image decoding; forwards a ChatJob to VLMModel and formats answers."""

    def __init__(self, config: ServeConfig, model: Any):
        self.cfg, self.model = config, model
        self.models = [ident for ident, _ in config.model_specs()]
        self.api_key = config.read_api_key()
        if self.api_key is None and config.require_api_key:  # fail closed, e.g. env var missing on the cluster
            raise RuntimeError(f"require_api_key is set but no key was found in ${config.api_key_env} or "
                               f"api_key_file={config.api_key_file}")
        self.created = int(time.time())

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
        return {"status": "ok", "batch_sizes": stats["batch_sizes"], "max_batch_size": stats["max_batch_size"]}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Any:
        try:
            self._auth(request)
        except ApiError as err:
            return err.response()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created,
                                            "owned_by": "crosslayer"} for m in self.models]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        try:
            self._auth(request)
            body = await read_json(request, self.cfg.max_body_bytes)
            job, options = await asyncio.to_thread(parse_chat_request, body, self.cfg, self.models)
            events = self.model.options(stream=True).stream.remote(job)
            first = await events.__anext__()
            if "error" in first:
                return JSONResponse({"error": first["error"]}, status_code=first["status"])
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": job.model}
            if options.stream:
                return StreamingResponse(self._chunks(events, meta, first["prompt_tokens"], options),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await self._complete(events, meta, first["prompt_tokens"])
        except ApiError as err:
            return err.response()
        except Exception as err:
            from ray.serve.exceptions import BackPressureError

            if isinstance(err, BackPressureError):
                return ApiError(503, "server is at capacity; retry later", code="overloaded").response()
            logger.exception("crosslayer: chat completion failed")
            return ApiError(500, f"internal error ({type(err).__name__})").response()

    async def _complete(self, events: Any, meta: dict, prompt_tokens: int) -> JSONResponse:
        text, last = [], {}
        async for event in events:
            if "error" in event:
                return JSONResponse({"error": event["error"]}, status_code=event["status"])
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
            yield _sse(ApiError(500, f"internal error while streaming ({type(err).__name__})").body())
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
        print(f"crosslayer serve: http://{args.host}:{args.port}/v1 models {[i for i, _ in cfg.model_specs()]}, "
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

    from . import gates

    gates.register(sub)
