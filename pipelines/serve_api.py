"""The serving contract: ``ServeConfig`` (every setting), ``ApiError`` (OpenAI-style errors), the validated request
(``ChatJob`` with its ``SamplingParams``) and the events a request's stream carries from the model to the ingress.

One stream per request, from ``VLMModel.generate`` through the deployment handle to ``OpenAIIngress``:
``Started`` (the prompt was accepted: its token count), then ``Delta`` events (one per choice and decode step: new
text, token count, log-probabilities, and on the choice's last one its ``finish_reason``), and always exactly one
``End`` last: ``End(error=None)`` after the last choice finished, or ``End(error=ApiError)`` instead of anything
that could not be done. ``End`` is the only end-of-stream signal.

Neither torch nor the model code is imported here, so ingress replicas stay light. No ``from __future__ import
annotations``: ``ServeConfig.__post_init__`` checks values against the fields' real types (``f.type is int``),
which that would turn into strings.
"""

import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fastapi.responses import JSONResponse

from .typed_config import build, check_fields

IMAGE = "<image>"  # placeholder put where an image part was (= cli_module.prompting.IMAGE, which pulls in torch)
DTYPES = ("float32", "bfloat16", "float16")
PIL_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
MAX_TOP_LOGPROBS = 20  # as OpenAI's API


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
    max_image_pixels: int = 4096 * 4096  # largest width x height, read from the header before decoding (413 above)
    max_images: int = 1  # images per request; the model takes one <image> per prompt, so 0 or 1
    max_prompt_tokens: int = 4096  # prompt tokens fed to the model, image tokens included (400 above)
    max_prompt_chars: int | None = None  # characters of message text, checked before tokenising (400 above);
    #                                      None: 16 x max_prompt_tokens
    max_tokens: int = 512  # cap on a request's max_tokens / max_completion_tokens (400 above)
    default_max_tokens: int = 128  # max_tokens when the request gives none
    max_stop: int = 4  # stop sequences per request
    image_url_allowlist: list[str] = field(default_factory=list)  # hosts http(s) image URLs may name ("*.x.org" ok)
    allow_private_image_hosts: bool = False  # let allowlisted hosts resolve to loopback/private/link-local addresses
    image_fetch_timeout_s: float = 5.0  # total deadline of one http(s) image fetch: queueing, DNS, connect and body
    image_fetch_workers: int = 4  # http(s) image fetches at once per ingress replica (their own threads)
    ingress_workers: int = 2  # threads per ingress replica that parse request bodies and decode images
    max_batch_size: int = 8  # most rows (choices) decoding at once in one model replica; more requests queue
    max_step_tokens: int = 512  # tokens one engine step computes: one per decoding row, the rest prompt chunks
    #                             (a longer prompt is prefilled over several steps); >= max_batch_size
    kv_cache_bytes: int | None = None  # KV bytes a model replica's requests may reserve, n x (prompt + max_tokens)
    #                                    positions each (more wait in the queue; a request over it alone: 400);
    #                                    None: max_batch_size x the model's context x bytes per position (on CUDA
    #                                    at most 90% of the memory free when the replica starts)
    batch_wait_timeout_s: float = 0.0  # how long an idle engine waits for more requests before its first prefill
    max_ongoing_requests: int = 32  # per model replica (Serve's cap): decoding rows plus queued requests
    min_replicas: int = 1  # autoscaling floor of model replicas
    max_replicas: int = 1  # autoscaling ceiling of model replicas
    target_ongoing_requests: float = 4.0  # autoscaling target per model replica
    num_cpus: float = 1.0  # CPUs reserved per model replica
    num_gpus: float | None = None  # GPUs per model replica; None: 1 if the driver sees CUDA, else 0
    ingress_replicas: int = 1  # OpenAIIngress replicas
    ingress_num_cpus: float = 0.5  # CPUs reserved per ingress replica
    playground: bool = True  # serve the web playground at / (pipelines.playground; behind the API key when set)
    playground_compare: str | None = None  # model id the playground answers beside the chosen one; None: the
    #                                        bare base when it is served (include_base), else no comparison. Checked
    #                                        by check_served (crosslayer serve adds --adapter ids after the YAML)

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str):
            self.adapters = [self.adapters]
        self.adapters = [a if isinstance(a, str) else f"{a['id']}={a['path']}" for a in self.adapters]
        self.image_url_allowlist = [h.lower() for h in self.image_url_allowlist]
        check_fields(self)  # every value of its annotated type (YAML can hand over strings), as TrainConfig's
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        positive = ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_tokens",
                    "default_max_tokens", "max_batch_size", "max_step_tokens", "max_ongoing_requests", "max_replicas",
                    "ingress_replicas", "image_fetch_timeout_s", "target_ongoing_requests", "image_fetch_workers",
                    "ingress_workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_stop", "min_replicas", "batch_wait_timeout_s", "num_cpus", "ingress_num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_prompt_chars is not None and self.max_prompt_chars <= 0:
            raise ValueError(f"max_prompt_chars must be > 0 or null (16 x max_prompt_tokens), got "
                             f"{self.max_prompt_chars}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0 or null (derived from max_batch_size and the model's "
                             f"context), got {self.kv_cache_bytes}")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(f"max_step_tokens={self.max_step_tokens} is below max_batch_size={self.max_batch_size}: "
                             f"every decoding row takes one token of a step and a prefill needs at least one more; "
                             f"raise max_step_tokens")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or null (auto), got {self.num_gpus}")
        if not 0 <= self.max_images <= 1:
            raise ValueError(f"max_images={self.max_images}: the model takes one <image> per prompt; use 0 or 1")
        if self.max_image_pixels > PIL_MAX_PIXELS:
            raise ValueError(f"max_image_pixels={self.max_image_pixels} exceeds Pillow's decompression-bomb limit of "
                             f"{PIL_MAX_PIXELS} pixels; one limit decides, so keep it at or below that")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens={self.max_tokens}")
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError(f"max_image_bytes={self.max_image_bytes} exceeds max_body_bytes={self.max_body_bytes}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch_size="
                             f"{self.max_batch_size}; Serve would never send a replica enough requests to fill "
                             f"its rows, raise it")
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
        """A mapping of ServeConfig fields (YAML, a Serve config's ``args``), through the typed-config engine:
        unknown keys and values of the wrong type fail naming them."""
        data = dict(data)
        adapters = data.get("adapters")
        if isinstance(adapters, (str, dict)):
            adapters = [adapters]
        if isinstance(adapters, list):  # {"id": ..., "path": ...} entries, as Serve configs write them
            data["adapters"] = [f"{a.get('id')}={a.get('path')}" if isinstance(a, dict) else a for a in adapters]
        return build(cls, data)

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
    def prompt_char_limit(self) -> int:
        """``max_prompt_chars``, or 16 characters per allowed prompt token when it is not set."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else 16 * self.max_prompt_tokens

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

    def check_served(self) -> None:
        """Settings that name served models, checked once the model list is complete (``build_app``)."""
        if self.playground_compare is not None and self.playground_compare not in self.model_ids:
            raise ValueError(f"playground_compare={self.playground_compare!r} is not a served model id "
                             f"{self.model_ids}; name one of them (an adapter served as ID=DIR, or the base with "
                             f"include_base)")

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


# --- errors -------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An OpenAI-style error: HTTP status plus {"message", "type", "param", "code"}. Pickles (it crosses the
    deployment handle inside ``End``)."""

    TYPES: ClassVar[dict[int, str]] = {401: "authentication_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __reduce__(self) -> tuple:
        return type(self), (self.status, self.message, self.param, self.code)

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def internal(cls, err: BaseException, during: str = "") -> "ApiError":
        """A 500 for an unexpected exception (log it where it is caught): the client sees only its type."""
        return cls(500, f"internal error{f' while {during}' if during else ''} ({type(err).__name__})")


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 whatever a client put in it (lone surrogates become backslash escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- the validated request ----------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    """How each choice of a request picks its tokens. The defaults leave the model's distribution as it is; the
    fields and their ranges are OpenAI's (temperature, top_p, seed, penalties, logit_bias, logprobs) and vLLM's
    (top_k, min_p, repetition_penalty, min_tokens)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability, [0, 1]
    seed: int | None = None  # choice i samples from a generator seeded with seed + i; None: unseeded
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated, [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the generated tokens, [-2, 2]
    repetition_penalty: float = 1.0  # prompt and generated tokens: logit / p if positive, else x p; (0, 10]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]
    min_tokens: int = 0  # the end-of-sequence token is masked until this many tokens were generated
    logprobs: bool = False  # return each generated token's log-probability (the model's, before sampling)
    top_logprobs: int = 0  # and this many most likely alternatives per token, [0, 20]; needs logprobs

    def __post_init__(self) -> None:
        checks = [("temperature", 0.0, 2.0), ("top_p", 1e-6, 1.0), ("min_p", 0.0, 1.0),
                  ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                  ("repetition_penalty", 1e-6, 10.0)]
        for name, lo, hi in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name}={value!r} is out of range [{lo}, {hi}]")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = all tokens), got {self.top_k}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs} is out of range [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        for token, bias in self.logit_bias.items():
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}]={bias} is out of range [-100, 100]")

    @property
    def greedy(self) -> bool:
        """Argmax of the (processed) logits: temperature 0."""
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before the choice (penalties, bias, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


@dataclass
class ChatJob:
    """What the ingress hands the model deployment: a validated request with decoded images."""

    model: str  # model id (adapter or base)
    messages: list[dict[str, str]]  # {"role", "content"}; each image part became "<image>\n" in its message
    images: list[Any]  # PIL RGB images, in order of their placeholders (0 or 1)
    max_tokens: int  # new tokens at most, per choice
    stop: list[str]  # stop sequences (not part of the answer)
    sampling: SamplingParams  # how tokens are chosen
    n: int = 1  # choices: n rows of the batch over one prefill
    return_gates: bool = False  # add the AGF gate summary to the final event

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.return_gates and self.n > 1:
            raise ValueError(f"return_gates takes one choice; got n={self.n}")


@dataclass
class StreamOptions:
    """How the ingress answers: as one JSON body or as server-sent events."""

    stream: bool  # answer as server-sent events
    include_usage: bool  # stream_options.include_usage: a last chunk holding usage


# --- the events of a request's stream ----------------------------------------------------------------------

@dataclass
class Started:
    """The model replica accepted the request: its prompt fits and its image is encoded."""

    prompt_tokens: int  # prompt tokens fed to the model, image tokens included


@dataclass
class Delta:
    """One decode step of one choice."""

    index: int  # the choice
    text: str  # new answer text ("" while a possible stop sequence or a partial character is held back)
    tokens: int  # tokens this choice has generated so far, end-of-sequence included (usage counts them)
    logprobs: list[dict[str, Any]] | None = None  # OpenAI logprobs.content entries of the new tokens
    finish_reason: str | None = None  # "stop" or "length" on the choice's last delta
    gates: dict[str, Any] | None = None  # on the last delta when return_gates: the AGF gate summary
    rows: int = 1  # rows decoding together in this step (the batch size this choice saw)
    time: float = 0.0  # when the engine chose the token (its replica's time.monotonic(): compare within a stream)


@dataclass
class End:
    """The last event of every stream: all choices finished (``error`` None), or what went wrong."""

    error: ApiError | None = None


Event = Started | Delta | End
