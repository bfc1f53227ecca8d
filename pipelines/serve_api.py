"""The serving API's contract: ``ServeConfig``, OpenAI-style errors and request parsing (ingress side).

``ServeConfig`` is every setting of ``crosslayer serve`` / ``app_builder`` (the ``args`` of a Serve config), with
safe defaults, checked eagerly. ``ApiError`` is an OpenAI-style error (``{"error": {message, type, param,
code}}``) as an HTTP response or as a stream event crossing the deployment handle. ``read_json`` and
``parse_chat_request`` turn a ``POST /v1/chat/completions`` body into a ``ChatJob`` within the limits: the body
size, messages and their image parts, sampling options, and each image loaded from a ``data:`` URL or an
allowlisted http(s) URL (public addresses only, no redirects) and decoded with its size checked first.
``pipelines.serve`` builds the Serve application on top. Neither torch nor the model code is imported here, so
ingress replicas stay light. No ``from __future__ import annotations``: ``ServeConfig.__post_init__`` checks
values against the fields' real types (``f.type is int``), which that would turn into strings.
"""

import base64
import binascii
import dataclasses
import io
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse

IMAGE = "<image>"  # placeholder put where an image part was (= cli_module.prompting.IMAGE, which pulls in torch)
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
    max_batch_size: int = 8  # most requests decoded together in one replica (one engine round)
    batch_wait_timeout_s: float = 0.05  # @serve.batch: how long a batch waits to fill up while the model is idle
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
        ids = self.model_ids
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

    @property
    def model_ids(self) -> list[str]:
        """The served model ids, in the order /v1/models lists them."""
        return [ident for ident, _ in self.model_specs()]

    def resolved(self) -> "ServeConfig":
        """A copy with ``base`` filled in from the adapters' configs (they must agree) when it was not given."""
        if self.base is not None:
            return self
        from cli_module.adapter import read_adapter_config

        bases = {read_adapter_config(p).base_model: p for _, p in self.model_specs() if p is not None}
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
        """The error as a stream event, to cross the deployment handle (``event_response`` answers it)."""
        return {**self.body(), "status": self.status}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @staticmethod
    def event_response(event: dict[str, Any]) -> JSONResponse:
        """The HTTP answer for an error ``event`` that came back from the model deployment."""
        return JSONResponse({"error": event["error"]}, status_code=event["status"])

    @classmethod
    def internal(cls, err: BaseException, during: str = "") -> "ApiError":
        """A 500 for an unexpected exception (log it where it is caught): the client sees only its type."""
        return cls(500, f"internal error{f' while {during}' if during else ''} ({type(err).__name__})")


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
