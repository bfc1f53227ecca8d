"""Bounded fuzzing of the chat completions input: mutations of valid requests (types, nesting, sizes, unicode,
numbers, URLs, raw bytes) must end as an answer or a 4xx ``ApiError``, never anything else.

``mutations`` is shared with ``test_serve.py``, which sends a few hundred of them over real HTTP; here a few
thousand go through the same code the server runs (JSON parsing, field checks, image loading with an empty
allowlist, and the model replica's ``Engine.prepare`` on the tiny base), in seconds, stopping by themselves.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Iterator
from typing import Any

from conftest import random_images

FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "return_gates", "response_format",
          "tools", "tool_choice", "user", "metadata", "store", "service_tier", "x-unknown", "")
NUMBERS = (0, 1, -1, 2, 3, 31, 32, 33, 2**31, 2**63, 2**64, -(2**63) - 1, 10**400, 0.0, 0.5, 1.0, 1.5, -0.0, 5.0,
           1e-300, 1e308, -1e308, float("inf"), float("-inf"), float("nan"))
STRINGS = ("", " ", "x", "plain", "tiny", "<image>", "\u0000", "\ud800", "\udfff", "\U0001f4a5" * 50, "\u202e",
           "é" * 100, "a" * 5000, "\r\n\r\n", "data:", "null", "[DONE]", "system", "user", "text", "image_url")
URLS = ("data:image/png;base64,", "data:image/png;base64,@@@", "data:image/png,abc", "data:;base64,AAAA",
        "http://127.0.0.1:8099\\@127.0.0.1/x", "http://user:pw@127.0.0.1/x", "https://[::1]/x", "http://[::1/x",
        "http://127.0.0.1:99999/x", "ftp://127.0.0.1/x", "file:///etc/passwd", "javascript:alert(1)",
        "http://example.com/" + "a" * 9000, "http://\u00e9xample.com/x", "http:///x", "//x", "http://0x7f.1/x",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode())


def png_url(seed: int = 0, size: int = 16) -> str:
    buf = io.BytesIO()
    random_images(1, seed=seed, size=(size, size))[0].save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def valid_requests(model: str) -> list[dict[str, Any]]:
    image = png_url()
    return [
        {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        {"model": model, "max_tokens": 3, "temperature": 0.7, "seed": 1, "stop": ["x"], "n": 2,
         "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                   {"type": "text", "text": "What is it?"}]}]},
        {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 2,
         "logprobs": True, "top_logprobs": 2, "messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"},
                                                           {"role": "user", "content": "c"}]},
    ]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(NUMBERS)
    if kind == 1:
        return rng.choice(STRINGS)
    if kind == 2:
        return rng.choice((None, True, False))
    if kind == 3:
        return rng.choice(URLS)
    if kind == 4:
        value: Any = "x"
        for _ in range(rng.choice((1, 10, 200, 800))):  # deeper nesting comes as raw bytes below
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {rng.choice(STRINGS + FIELDS): _value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"type": rng.choice(("text", "image_url", "image", None)), "text": _value(rng, depth + 1),
            "image_url": {"url": rng.choice(URLS)}}


def _mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any] | list:
    body = json.loads(json.dumps(body))
    op = rng.randrange(7)
    messages = body.get("messages")
    if 2 <= op <= 5 and not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        op = 0  # the messages were mutated away already
    if op == 0:
        body[rng.choice(FIELDS)] = _value(rng)
    elif op == 1 and body:
        body.pop(rng.choice(list(body)))
    elif op == 2:
        message = rng.choice(body["messages"])
        message[rng.choice(("role", "content", "name", "tool_calls", "x"))] = _value(rng)
    elif op == 3:
        message = rng.choice(body["messages"])
        content = message.get("content")
        parts = [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []
        if parts:
            rng.choice(parts)[rng.choice(("type", "text", "image_url", "detail"))] = _value(rng)
        else:
            message["content"] = [_value(rng) for _ in range(rng.randrange(1, 4))]
    elif op == 4:
        body["messages"].append({"role": "user", "content": [{"type": "image_url",
                                                              "image_url": {"url": rng.choice(URLS)}}]})
    elif op == 5:
        body["messages"] = body["messages"] * rng.choice((2, 20, 100))
    else:
        return [body] if rng.random() < 0.5 else [body.get("messages")]
    return body


def mutations(seed: int, count: int, model: str = "plain") -> Iterator[bytes]:
    """``count`` request bodies: mutated valid requests, serialised (NaN/Infinity included), some then corrupted
    at the byte level (truncated, bytes flipped or inserted, invalid UTF-8)."""
    rng = random.Random(seed)
    bases = valid_requests(model)
    for _ in range(count):
        body = rng.choice(bases)
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutated = _mutate(rng, body)
            if not isinstance(mutated, dict):
                body = mutated
                break
            body = mutated
        raw = json.dumps(body).encode()[:200_000]  # a cut body is one more kind of invalid JSON
        if rng.random() < 0.15:
            at = rng.randrange(len(raw))
            raw = rng.choice((raw[:at], raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:],
                              raw[:at] + b"\xff\xfe" + raw[at:], raw[:at] + b"[" * 5000 + raw[at:]))
        yield raw


def test_fuzzed_requests_are_answered_or_4xx(tiny_base):
    import torch

    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM
    from pipelines.serve_api import ApiError, ServeConfig
    from pipelines.serve_engine import Engine
    from pipelines.serve_images import load_image
    from pipelines.serve_request import parse_chat_request, parse_json

    torch.manual_seed(0)
    cfg = ServeConfig(base="tiny", max_body_bytes=256 * 1024, max_image_bytes=32 * 1024, max_tokens=32,
                      default_max_tokens=8, max_prompt_tokens=256, api_key_env=None)
    engine = Engine({"plain": FusedVLM(tiny_base, CLIConfig(vision_layers=[0, 1], inject_layers=[0], attn_dim=16))
                     .eval()}, max_rows=8, max_prompt_tokens=cfg.max_prompt_tokens)
    outcomes: dict[str, int] = {}
    t0, cases = time.monotonic(), 0
    for cases, raw in enumerate(mutations(seed=0, count=3000), start=1):
        try:
            body = parse_json(raw)
            job, _, urls = parse_chat_request(body, cfg, ["plain"])
            job.images = [load_image(url, cfg) for url in urls]
            engine.prepare(job, f"r{cases}")
            outcome = "ok"
        except ApiError as err:
            assert 400 <= err.status < 500, (err.status, err.message, raw[:300])
            json.dumps(err.body()).encode()  # the answer renders (no lone surrogates reach the encoder)
            err.response()
            outcome = f"{err.status} {err.code}"
        except ValueError as err:  # the model replica answers these 400 ("could not prepare the request")
            outcome = f"400 prepare: {type(err).__name__}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if time.monotonic() - t0 > 60:  # a bound for a very slow machine; about 10 s on the 2-core CPU
            break
    assert cases >= 500, cases
    assert outcomes.get("ok", 0) >= 50 and len(outcomes) >= 10, outcomes
