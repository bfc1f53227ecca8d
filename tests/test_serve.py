"""Online serving over real Ray Serve and real HTTP on 127.0.0.1: the official openai client against the API.

One Serve instance for the module, two applications: "main" at / (two adapters over the tiny base, small
limits) and "secure" at /secure (the bare base, API key from a file). Answers are checked against the same
adapters run in this process.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, perturb, random_images
from reference_decode import greedy

KEY = "sk-test-0123456789"
LIMITS = {"max_body_bytes": 64 * 1024, "max_image_bytes": 32 * 1024, "max_image_pixels": 128 * 128, "max_tokens": 32,
          "default_max_tokens": 8, "max_prompt_tokens": 256, "api_key_env": None, "ingress_num_cpus": 0.1}
SECURE = {"max_tokens": 480, "image_url_allowlist": ["127.0.0.1"], "allow_private_image_hosts": True,
          "image_fetch_timeout_s": 1.0}  # the /secure app: long generations, loopback image hosts
ROOT = Path(__file__).resolve().parents[1]


def png_data_url(image=None, size: tuple[int, int] = (16, 16)) -> str:
    buf = io.BytesIO()
    (image or random_images(1, size=size)[0]).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    import torch

    from cli_module.adapter import save_adapter
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    torch.manual_seed(0)  # AGF's random init: the same adapters, so the same answers, in every run
    root = tmp_path_factory.mktemp("adapters")
    cfg = CLIConfig(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4)
    base = load_base("tiny")
    plain, tuned = FusedVLM(base, cfg), FusedVLM(base, cfg)
    perturb(tuned)
    save_adapter(plain, root / "plain")
    save_adapter(tuned, root / "tuned")
    return {"plain": root / "plain", "tuned": root / "tuned"}


@pytest.fixture(scope="module")
def server(ray_local, adapters, tmp_path_factory):
    from ray import serve

    from pipelines.serve import app_builder

    key_file = tmp_path_factory.mktemp("secret") / "api_key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = app_builder({"adapters": [str(adapters["plain"]), str(adapters["tuned"])], "base": "tiny",
                        "max_batch_size": 8, "batch_wait_timeout_s": 0.3, "num_cpus": 0.5, **LIMITS})
    secure = app_builder({"base": "tiny", "api_key_file": str(key_file), "num_cpus": 0.25, **LIMITS, **SECURE})
    serve.run_many([serve.RunTarget(main, name="main", route_prefix="/"),
                    serve.RunTarget(secure, name="secure", route_prefix="/secure")])
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(adapters):
    """The served adapters, loaded here: greedy answers and prompt token counts to compare with."""
    from cli_module.adapter import load_adapter
    from cli_module.prompting import chat_prompt

    models = {name: load_adapter(path) for name, path in adapters.items()}

    def answer(name: str, question: str, image, max_tokens: int = 8) -> tuple[str, int, int]:
        model = models[name]
        tok = model.base.tokenizer
        enc, visual = model.prepare_inputs([chat_prompt(tok, question)], [image])
        tokens = greedy(model, enc["input_ids"], enc["attention_mask"], visual=visual,
                        max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id)
        ids = tokens[0].tolist()
        text_ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        return tok.decode(text_ids, skip_special_tokens=True), int(enc["attention_mask"].sum()), len(ids)

    return answer


def http(url: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def test_models_route_to_their_adapters_with_usage(client, local):
    image = random_images(1, seed=3)[0]
    assert sorted(m.id for m in client.models.list().data) == ["plain", "tuned"]
    texts = {}
    for name in ("plain", "tuned"):
        resp = client.chat.completions.create(model=name, messages=user("What is this?", png_data_url(image)),
                                              temperature=0, max_tokens=8)
        text, prompt_tokens, completion_tokens = local(name, "What is this?", image)
        assert resp.object == "chat.completion" and resp.model == name
        assert resp.choices[0].message.content == text
        assert resp.usage.prompt_tokens == prompt_tokens  # text tokens + the image's 16 feature tokens
        assert resp.usage.completion_tokens == completion_tokens
        assert resp.usage.total_tokens == prompt_tokens + completion_tokens
        texts[name] = text
    assert texts["plain"] != texts["tuned"]  # the perturbed adapter really injects
    status, body = http(f"{client.base_url}nope")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_stream_matches_non_streamed_answer(client, server):
    messages = user("Describe the picture.", png_data_url())
    full = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    status, raw = http(f"{server}/v1/chat/completions", {"model": "plain", "messages": messages, "stream": True,
                                                         "max_tokens": 4})
    assert status == 200 and raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_stop_sequences_cut_the_answer_alike_in_both_modes(client):
    messages = user("Say something.", png_data_url())
    text = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=24)
    text = text.choices[0].message.content
    stop = next(c for c in text[1:] if c != "\ufffd")  # random bytes; U+FFFD can be a half-decoded character
    cut = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=24,
                                            stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.index(stop)]


def test_concurrent_requests_are_batched(client, server, local):
    """16 concurrent requests, each with its own image: every answer equals its sequential (in-process) answer
    and the deployment reports batches of more than one request."""
    images = random_images(16, seed=5)
    questions = ["Hi?", "What colour is it?", "Count the objects, please.", "Is it day or night outside?", "Why?",
                 "Where?", "What is this?", "Describe it."]
    asks = [("tuned" if i % 2 == 0 else "plain", questions[i % len(questions)], images[i]) for i in range(16)]

    def ask(model_question_image: tuple):
        model, question, image = model_question_image
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=user(question, png_data_url(image)), temperature=0, max_tokens=4)
        return raw.parse(), int(raw.headers["x-batch-size"])

    with ThreadPoolExecutor(len(asks)) as pool:
        results = list(pool.map(ask, asks))
    for (model, question, image), (resp, _) in zip(asks, results):  # left-padded rows answer as they would alone
        assert resp.model == model
        assert resp.choices[0].message.content == local(model, question, image, max_tokens=4)[0]
    status, health = http(f"{server}/healthz")
    assert status == 200 and health["status"] == "ok"
    assert max(int(size) for size in health["batch_sizes"]) > 1, health
    assert max(size for _, size in results) > 1


def test_request_rejection_and_token_counters(client, server):
    """The /healthz tallies (kept next to the crosslayer_* Ray metrics counters): requests, rejections by reason,
    generated tokens == the usage's completion tokens."""

    def health() -> dict:
        status, body = http(f"{server}/healthz")
        assert status == 200, body
        return body

    before = health()
    url = f"{server}/v1/chat/completions"
    good = client.chat.completions.create(model="plain", messages=user("Count.", png_data_url()), temperature=0,
                                          max_tokens=5)
    assert http(url, {"model": "nope", "messages": user("hi")})[0] == 404  # rejected by the ingress
    assert http(url, {"model": "plain", "messages": user("word " * 300)})[0] == 400  # by the model replica
    after = health()
    assert after["requests"] - before["requests"] == 3
    assert after["rejected"] - before["rejected"] == 2
    by_reason = {k: v - before["rejected_by_reason"].get(k, 0) for k, v in after["rejected_by_reason"].items()}
    assert {k: v for k, v in by_reason.items() if v} == {"model_not_found": 1, "context_length_exceeded": 1}
    assert after["generated_tokens"] - before["generated_tokens"] == good.usage.completion_tokens


def test_return_gates_and_heatmap(client, tmp_path):
    import numpy as np

    from jobs.cli import main

    resp = client.chat.completions.create(model="tuned", messages=user("What is this?", png_data_url()),
                                          temperature=0, max_tokens=5, extra_body={"return_gates": True})
    gates = resp.model_extra["gates"]
    values = np.asarray(gates["values"])
    assert values.shape == (resp.usage.completion_tokens, 2, 3) == tuple(gates["shape"])
    assert gates["inject_layers"] == [0, 1] and gates["vision_layers"] == [0, 1, 2]
    assert len(gates["tokens"]) == resp.usage.completion_tokens
    assert ((values >= 0) & (values <= 1)).all()
    (tmp_path / "resp.json").write_text(resp.model_dump_json())
    assert main(["gates", str(tmp_path / "resp.json"), "--out", str(tmp_path / "heat.png")]) == 0
    png = (tmp_path / "heat.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    chunks = list(client.chat.completions.create(model="tuned", messages=user("What?", png_data_url()), temperature=0,
                                                 max_tokens=4, stream=True, extra_body={"return_gates": True}))
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert np.asarray(final.model_extra["gates"]["values"]).shape[1:] == (2, 3)


def test_api_key_is_required_when_configured(server):
    import openai

    url = f"{server}/secure/v1"
    status, body = http(f"{url}/chat/completions", {"model": "tiny", "messages": user("hi")})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == ["tiny"]
    resp = good.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens >= 1


@pytest.mark.parametrize("name", ["body", "images", "max_tokens", "base64", "not_image", "image_bytes", "pixels",
                                  "model", "loopback_url", "json", "prompt_tokens", "n", "prompt_chars"])
def test_limits_and_bad_requests(server, name):
    from PIL import Image

    url = f"{server}/v1/chat/completions"
    ok = {"model": "plain", "messages": user("hi", png_data_url()), "max_tokens": 2}
    noise = base64.b64encode(bytes(range(256)) * 150).decode()  # 38 KiB decoded: over the 32 KiB image cap
    cases = {
        "body": (413, "body_too_large", {**ok, "padding": "x" * 70_000}),
        "images": (400, "too_many_images", {**ok, "messages": user("hi", png_data_url(), png_data_url())}),
        "max_tokens": (400, "max_tokens_exceeded", {**ok, "max_tokens": 33}),
        "base64": (400, "invalid_base64", {**ok, "messages": user("hi", "data:image/png;base64,@@not-base64@@")}),
        "not_image": (400, "invalid_image", {**ok, "messages": user("hi", "data:image/png;base64,"
                                                                        + base64.b64encode(b"hello").decode())}),
        "image_bytes": (413, "image_too_large", {**ok, "messages": user("hi", f"data:image/png;base64,{noise}")}),
        "pixels": (413, "image_too_large", {**ok, "messages": user("hi", png_data_url(Image.new("RGB", (200, 90))))}),
        "model": (404, "model_not_found", {**ok, "model": "nope"}),
        "loopback_url": (400, "image_url_not_allowed", {**ok, "messages": user("hi", "http://127.0.0.1:1/x.png")}),
        "json": (400, "invalid_json", b'{"model": "plain", "messages": ['),
        "prompt_tokens": (400, "context_length_exceeded", {**ok, "messages": user("word " * 300)}),
        "n": (400, "invalid_value", {**ok, "n": 99}),  # over max_batch_size (n > 1 is honoured)
        # over max_prompt_chars (16 x max_prompt_tokens = 4096): refused by the ingress before any tokeniser runs
        "prompt_chars": (400, "context_length_exceeded", {**ok, "messages": user("word " * 2000)}),
    }
    status, code, body = cases[name]
    got, answer = http(url, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    if name == "max_tokens":
        assert "32" in error["message"] and error["param"] == "max_tokens"
    got, answer = http(url, ok)  # the server still answers a good request
    assert got == 200 and answer["usage"]["completion_tokens"] >= 1


def test_serve_config_validation_and_yaml():
    from ray.serve.schema import ServeDeploySchema

    from jobs.cli import build_parser
    from pipelines.serve import ServeConfig, app_builder

    with pytest.raises(ValueError, match="max_ongoing_requests=4 is below max_batch_size=8"):
        ServeConfig(max_ongoing_requests=4)
    with pytest.raises(ValueError, match="default_max_tokens=600 exceeds max_tokens=512"):
        ServeConfig(default_max_tokens=600)
    with pytest.raises(ValueError, match="max_tokens must be an integer, got '512'"):
        ServeConfig(max_tokens="512")
    with pytest.raises(ValueError, match="max_images=3"):
        ServeConfig(max_images=3)
    with pytest.raises(ValueError, match="unknown config key 'max_tokenz'; valid keys at the top level are"):
        ServeConfig.from_dict({"max_tokenz": 3})
    with pytest.raises(ValueError, match="max_batch_size must be an integer, got 2.5"):
        ServeConfig.from_dict({"max_batch_size": 2.5})
    with pytest.raises(ValueError, match="used twice"):
        ServeConfig(base="tiny", adapters=["a=/x/one", "a=/y/two"])
    assert [i for i, _ in ServeConfig(adapters=["/x/plain", "best=/y/tuned"]).model_specs()] == ["plain", "best"]
    path = ROOT / "cluster/serve/config.yaml"
    text = path.read_text()
    assert text.startswith("#") and "serve run cluster/serve/config.yaml" in text.splitlines()[0]
    import yaml

    raw = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    assert app.import_path == "pipelines.serve:app_builder"
    assert {d.name for d in app.deployments} == {"VLMModel", "OpenAIIngress"}
    cfg = ServeConfig.from_yaml(path)
    assert cfg.base == "tiny" and cfg.adapters == [] and [i for i, _ in cfg.model_specs()] == ["tiny"]
    assert app_builder(app.args) is not None
    args = build_parser().parse_args(["serve", "--adapter", "a", "--adapter", "b=c", "--port", "9000"])
    assert args.adapter == ["a", "b=c"] and args.port == 9000 and args.host == "127.0.0.1"
    assert build_parser().parse_args(["gates", "in.json", "--out", "x.png"]).out == "x.png"


def test_image_url_fetching_rules():
    """Allowlisted http(s) image URLs: public addresses only unless allowed, no redirects, byte cap (no Ray)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipelines.serve_api import ApiError, ServeConfig
    from pipelines.serve_images import load_image

    png = base64.b64decode(png_data_url().split(",", 1)[1])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/x.png")
                self.end_headers()
                return
            body = png if self.path == "/x.png" else b"x" * 40_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        opened = ServeConfig(image_url_allowlist=["127.0.0.1"], allow_private_image_hosts=True, **LIMITS)
        assert load_image(f"{url}/x.png", opened).size == (16, 16)
        cases = [(ServeConfig(**LIMITS), "/x.png", 400, "not on this server's image_url_allowlist"),
                 (ServeConfig(image_url_allowlist=["127.0.0.1"], **LIMITS), "/x.png", 400, "non-public address"),
                 (opened, "/moved", 400, "answered HTTP 302 .*no redirects"),
                 (opened, "/big", 413, "max_image_bytes=32768")]
        for cfg, path, status, message in cases:
            with pytest.raises(ApiError, match=message) as err:
                load_image(url + path, cfg)
            assert err.value.status == status
        with pytest.raises(ApiError, match="malformed image URL"):
            load_image("http://127.0.0.1:99999999/x.png", opened)
    finally:
        httpd.shutdown()


# --- continuous batching, cancellation, the OpenAI surface, no 5xx ------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height in its header (no pixel data): what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def secure_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/secure/v1", api_key=KEY, max_retries=0, timeout=60)


def secure_health(server: str) -> dict:
    status, body = http(f"{server}/secure/healthz")
    assert status == 200, body
    return body


def settled_tokens(server: str) -> int:
    """The /secure app's generated-token counter once it stopped moving (two reads 0.3 s apart agree)."""
    last = secure_health(server)["generated_tokens"]
    for _ in range(60):
        time.sleep(0.3)
        now = secure_health(server)["generated_tokens"]
        if now == last:
            return now
        last = now
    raise AssertionError("the generated-token counter never settled")


def serve_logs() -> dict[Path, int]:
    """Serve's log files (controller, proxy, replicas) and their sizes now."""
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return {p: p.stat().st_size for p in logs.glob("*.log")}


def new_log_lines(before: dict[Path, int]) -> list[str]:
    lines = []
    for path in serve_logs():
        with open(path, "rb") as f:
            f.seek(before.get(path, 0))
            lines += f.read().decode(errors="replace").splitlines()
    return lines


def test_models_retrieve_and_prometheus_metrics(client, server):
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    assert client.models.retrieve("tuned").id == "tuned"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    client.chat.completions.create(model="plain", messages=user("Hi", png_data_url()), temperature=0, max_tokens=3)
    with urllib.request.urlopen(f"{server}/metrics", timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    for name in ("crosslayer_requests", "crosslayer_rejected_requests", "crosslayer_generated_tokens",
                 "crosslayer_prompt_tokens", "crosslayer_cancelled_requests", "crosslayer_requests_waiting",
                 "crosslayer_rows_running", "crosslayer_time_to_first_token_seconds",
                 "crosslayer_inter_token_latency_seconds", "crosslayer_request_latency_seconds"):
        assert name in families, sorted(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("crosslayer_time_to_first_token_seconds_count", (("model", "plain"),))] >= 1
    assert samples[("crosslayer_inter_token_latency_seconds_count", (("model", "plain"),))] >= 1
    assert samples[("crosslayer_requests_total", (("model", "plain"), ("status", "200")))] >= 1
    assert samples[("crosslayer_rows_running", ())] == 0 and samples[("crosslayer_requests_waiting", ())] == 0
    status, _ = http(f"{server}/secure/metrics")
    assert status == 401  # behind the API key where one is configured


def test_logprobs_and_n_choices(client, local):
    image = random_images(1, seed=8)[0]
    messages = user("What is this?", png_data_url(image))
    resp = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=6, n=2,
                                          logprobs=True, top_logprobs=3)
    text, _, completion = local("tuned", "What is this?", image, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 2 * completion
    for choice in resp.choices:
        assert choice.message.content == text
        entries = choice.logprobs.content
        assert len(entries) in (completion, completion - 1)  # EOS has no entry
        for entry in entries:
            tops = [t.logprob for t in entry.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob <= 0
            assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(tops[0])
    chunks = list(client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=6,
                                                 logprobs=True, stream=True))
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in resp.choices[0].logprobs.content]


def test_seeded_sampling_and_vllm_sampling_fields(client):
    messages = user("Say something.", png_data_url(random_images(1, seed=9)[0]))
    sampled = {"model": "tuned", "messages": messages, "temperature": 1.0, "max_tokens": 10, "seed": 42, "n": 2}
    first = [c.message.content for c in client.chat.completions.create(**sampled).choices]
    with ThreadPoolExecutor(3) as pool:  # the same answers with other requests in the batch
        again = list(pool.map(lambda _: client.chat.completions.create(**sampled), range(3)))
    assert all([c.message.content for c in r.choices] == first for r in again)
    greedy = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=10)
    top1 = client.chat.completions.create(model="tuned", messages=messages, temperature=1.0, max_tokens=10, seed=3,
                                          extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.0})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize(("field", "value", "param"), [
    ("response_format", {"type": "json_object"}, "response_format"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tools"),
    ("tool_choice", "auto", "tool_choice"),
    ("frobnicate", 1, "frobnicate"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ("top_logprobs", 2, "top_logprobs"),  # without logprobs
    ("logit_bias", {"5": 101}, "logit_bias"),
    ("logit_bias", {"x": 1}, "logit_bias"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("stream_options", {"include_usage": True}, "stream_options"),  # without stream
    ("messages", [{"role": "user", "content": "hi", "name": "bob"}], "messages[0].name"),
    ("messages", [{"role": "tool", "content": "hi"}], "messages[0].role"),
])
def test_fields_are_honoured_or_refused_by_name(server, field, value, param):
    ok = {"model": "plain", "messages": user("hi"), "max_tokens": 2}
    status, answer = http(f"{server}/v1/chat/completions", {**ok, field: value})
    assert status == 400, answer
    assert answer["error"]["param"] == param and param.split("[")[0] in answer["error"]["message"]
    no_ops = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "store": False,
              "user": "u-1", "metadata": {"k": "v"}, "service_tier": "auto", "modalities": ["text"]}
    status, answer = http(f"{server}/v1/chat/completions", {**ok, **no_ops})
    assert status == 200, answer


def raw_body(**fields) -> bytes:
    """A request body with Python floats (inf, nan) written the way json.dumps writes them: Infinity, NaN."""
    return json.dumps({"model": "plain", "messages": user("hi"), **fields}).encode()


@pytest.mark.parametrize("name", ["nesting", "max_tokens_inf", "max_tokens_nan", "seed_nan", "max_tokens_float",
                                  "content_null", "text_null", "backslash_url", "bomb", "bomb_bigger",
                                  "lone_surrogate", "n_float"])
def test_bad_input_is_4xx_naming_the_field(server, name):
    cases = {
        "nesting": (b'{"model": "plain", "messages": ' + b"[" * 60_000, 400, None),
        "max_tokens_inf": (raw_body(max_tokens=float("inf")), 400, "max_tokens"),
        "max_tokens_nan": (raw_body(max_tokens=float("nan")), 400, "max_tokens"),
        "seed_nan": (raw_body(seed=float("nan")), 400, "seed"),
        "max_tokens_float": (raw_body(max_tokens=5.0), 400, "max_tokens"),
        "n_float": (raw_body(n=1.0), 400, "n"),
        "content_null": (raw_body(messages=[{"role": "user", "content": None}]), 400, "messages[0].content"),
        "text_null": (raw_body(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]), 400,
                      "messages[0].content[0].text"),
        "backslash_url": (raw_body(messages=user("hi", "http://127.0.0.1:8099\\@127.0.0.1/x")), 400, "image_url"),
        "bomb": (raw_body(messages=user("hi", "data:image/png;base64,"
                                              + base64.b64encode(png_header(10_000, 10_000)).decode())), 413,
                 "image_url"),
        "bomb_bigger": (raw_body(messages=user("hi", "data:image/png;base64,"
                                                     + base64.b64encode(png_header(20_000, 20_000)).decode())), 413,
                        "image_url"),
        "lone_surrogate": (b'{"model": "plain", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
                           "messages[0].content[0].text"),
    }
    body, status, param = cases[name]
    got, answer = http(f"{server}/v1/chat/completions", body)
    assert got == status, answer
    assert answer["error"]["param"] == param and answer["error"]["message"]
    if status == 413:
        assert answer["error"]["code"] == "image_too_large" and "max_image_pixels=16384" in answer["error"]["message"]
    assert http(f"{server}/v1/chat/completions", {"model": "plain", "messages": user("hi"), "max_tokens": 2})[0] == 200


def test_short_request_joins_a_running_generation(server, secure_client):
    """Continuous batching: a short request sent while a 400-token generation runs is answered long before that
    generation ends, decoded in the same steps (its batch had 2 rows)."""
    import threading

    progress, done = [], threading.Event()

    def long_generation() -> None:
        for chunk in secure_client.chat.completions.create(
                model="tiny", messages=user("Count."), max_tokens=400, temperature=0, stream=True, logprobs=True,
                extra_body={"min_tokens": 400}):
            progress.append(len(chunk.choices[0].logprobs.content) if chunk.choices and chunk.choices[0].logprobs
                            else 0)
        done.set()

    thread = threading.Thread(target=long_generation)
    thread.start()
    while sum(progress) < 20:
        time.sleep(0.01)
    raw = secure_client.chat.completions.with_raw_response.create(model="tiny", messages=user("Quick?"), max_tokens=3,
                                                                  temperature=0)
    ended_before = not done.is_set()
    tokens_at_answer = sum(progress)
    thread.join()
    assert raw.parse().usage.completion_tokens >= 1 and raw.headers["x-batch-size"] == "2"
    assert ended_before and tokens_at_answer < 400, tokens_at_answer


def test_client_disconnect_frees_its_row_without_errors(server):
    """A client that goes away mid-generation (streaming at token 12, or non-streaming by its timeout) stops the
    generation: the generated-token counter settles far below the 400 tokens asked for, and no ERROR is logged."""
    import http.client
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(server).hostname, urlsplit(server).port
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = {"model": "tiny", "messages": user("Count to a thousand."), "max_tokens": 400, "min_tokens": 400,
            "temperature": 0, "logprobs": True}
    logs = serve_logs()
    cancelled = secure_health(server)["cancelled"]
    generated = []
    for stream in (True, False):
        before = settled_tokens(server)
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("POST", "/secure/v1/chat/completions", json.dumps({**body, "stream": stream}), headers)
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200
            seen = 0
            while seen < 12:
                line = resp.readline()
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:])["choices"]
                    seen += sum(len((c.get("logprobs") or {}).get("content") or []) for c in choices)
        else:
            time.sleep(0.3)  # the request is decoding; then the client gives up
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        generated.append(settled_tokens(server) - before)
    assert all(0 < g < 400 for g in generated), generated
    assert secure_health(server)["cancelled"] - cancelled == 2
    lines = new_log_lines(logs)
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines[-20:]


def test_fuzzed_requests_never_5xx(server):
    """A few hundred mutated requests (test_serve_fuzz.mutations) over real HTTP, 8 at a time: every answer is a
    2xx or 4xx, and the server is healthy and answers a good request afterwards."""
    from test_serve_fuzz import mutations

    url = f"{server}/v1/chat/completions"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda raw: (http(url, raw)[0], raw[:200]), mutations(seed=1, count=300)))
    failed = [(status, raw) for status, raw in answers if status >= 500]
    assert not failed, failed[:5]
    assert sum(status == 200 for status, _ in answers) >= 10
    assert http(f"{server}/healthz")[1]["status"] == "ok"
    assert http(url, {"model": "plain", "messages": user("hi", png_data_url()), "max_tokens": 2})[0] == 200
