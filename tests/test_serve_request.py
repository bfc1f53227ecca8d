"""Request parsing and image loading of the serving ingress, without Ray: field rules, the pixel rule, strict image
URLs, and http(s) fetches against misbehaving servers on loopback (total deadline, own bounded pool)."""

from __future__ import annotations

import asyncio
import base64
import io
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import random_images

from pipelines.serve_api import ApiError, ServeConfig
from pipelines.serve_images import ImageLoader, check_url, decode_image, fetch_image, load_image
from pipelines.serve_request import parse_chat_request, parse_json

LIMITS = {"max_body_bytes": 64 * 1024, "max_image_bytes": 32 * 1024, "max_tokens": 32, "default_max_tokens": 8,
          "max_prompt_tokens": 256, "api_key_env": None}


def png_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    random_images(1, size=size)[0].save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


class Misbehaving(socketserver.BaseRequestHandler):
    """Answers by path: /png a good image, /chunked the same chunked, /badstatus a bad status line, /longheader a
    70 KB header line, /slow one header byte every 0.2 s, /missing 404, /moved a redirect, /reset nothing."""

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            part = self.request.recv(4096)
            if not part:
                return
            data += part
        path = data.split(b" ", 2)[1].decode()
        png = png_bytes()
        send = self.request.sendall
        try:
            if path == "/png":
                send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png)
            elif path == "/chunked":
                send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(png) + png + b"\r\n0\r\n\r\n")
            elif path == "/badstatus":
                send(b"HELLO THERE\r\n\r\n")
            elif path == "/longheader":
                send(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n")
            elif path == "/slow":
                send(b"HTTP/1.1 200 OK\r\n")
                for _ in range(150):  # 30 s at most; ends when the client hangs up
                    send(b"x")
                    time.sleep(0.2)
            elif path == "/missing":
                send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            elif path == "/moved":
                send(b"HTTP/1.1 302 Found\r\nLocation: /png\r\nContent-Length: 0\r\n\r\n")
            elif path == "/big":
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 1000)
        except OSError:
            pass  # the client hung up


@pytest.fixture(scope="module")
def misbehaving():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def loopback(**overrides) -> ServeConfig:
    return ServeConfig(**{**LIMITS, "image_url_allowlist": ["127.0.0.1"], "allow_private_image_hosts": True,
                          "image_fetch_timeout_s": 1.0, **overrides})


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/badstatus", 400, "image_fetch_failed"), ("/longheader", 400, "image_fetch_failed"),
    ("/missing", 400, "image_fetch_failed"), ("/moved", 400, "image_fetch_failed"),
    ("/reset", 400, "image_fetch_failed"), ("/big", 413, "image_too_large"), ("/slow", 400, "image_fetch_timeout"),
])
def test_misbehaving_image_hosts_are_4xx(misbehaving, path, status, code):
    t0 = time.monotonic()
    with pytest.raises(ApiError) as err:
        fetch_image(misbehaving + path, loopback())
    assert (err.value.status, err.value.code, err.value.param) == (status, code, "image_url")
    assert time.monotonic() - t0 < 2.0  # image_fetch_timeout_s=1 is a total deadline, not per read


def test_good_image_hosts(misbehaving):
    assert load_image(misbehaving + "/png", loopback()).size == (16, 16)
    assert load_image(misbehaving + "/chunked", loopback()).size == (16, 16)


def test_slow_hosts_do_not_delay_other_requests(misbehaving):
    """Eight fetches from a host trickling one byte every 0.2 s, two fetch threads: each fails by its deadline
    (queued ones too), and a data: URL image meanwhile decodes at once on the parse pool."""
    cfg = loopback(image_fetch_workers=2)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()

    async def scenario() -> tuple[float, list, float]:
        loader = ImageLoader(cfg, ThreadPoolExecutor(2))
        t0 = time.monotonic()
        slow = [asyncio.ensure_future(loader.load_one(misbehaving + "/slow")) for _ in range(8)]
        await asyncio.sleep(0.05)
        image = await loader.load_one(data_url)
        inline = time.monotonic() - t0
        assert image.size == (16, 16)
        results = await asyncio.gather(*slow, return_exceptions=True)
        loader.close()
        return inline, results, time.monotonic() - t0

    inline, results, total = asyncio.run(scenario())
    assert inline < 0.6, inline
    assert all(isinstance(r, ApiError) and r.code == "image_fetch_timeout" for r in results), results
    assert total < 2.5, total


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:8099\\@127.0.0.1/x", "backslashes"),
    ("http://user:pw@127.0.0.1/x.png", "credentials"),
    ("http://127.0.0.1/caf\u00e9.png", "ASCII"),
    ("http://127.0.0.1/a b.png", "spaces"),
    ("http://127.0.0.1:99999999/x.png", "malformed image URL"),
    ("http://127.0.0.1:80:80/x.png", "malformed image URL"),
    ("http://[::1/x.png", "malformed image URL"),
    ("http:///x.png", "malformed image URL"),
    ("https://evil.example/x.png", "not on this server's image_url_allowlist"),
    ("http://" + "a" * 9000, "longer than"),
])
def test_image_urls_are_strict(url, message):
    with pytest.raises(ApiError, match=message) as err:
        check_url(url, loopback())
    assert err.value.status == 400


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(4097, 4096), (10_000, 10_000), (20_000, 20_000)])
def test_one_pixel_rule_one_status(width, height):
    """Over max_image_pixels is 413 whether this server's check or Pillow's bomb guard sees it first."""
    with pytest.raises(ApiError, match=r"pixels, over max_image_pixels=16777216") as err:
        decode_image(png_header(width, height), 4096 * 4096)
    assert (err.value.status, err.value.code) == (413, "image_too_large")
    with pytest.raises(ApiError, match="not a decodable image") as err:
        decode_image(png_header(16, 16), 4096 * 4096)  # header only, no pixel data
    assert err.value.status == 400
    with pytest.raises(ValueError, match="Pillow's decompression-bomb limit"):
        ServeConfig(max_image_pixels=10**9)


def test_request_fields():
    cfg = ServeConfig(**LIMITS, max_prompt_chars=100)
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def refused(body: dict, param: str, status: int = 400) -> ApiError:
        with pytest.raises(ApiError) as err:
            parse_chat_request(body, cfg, ["m"])
        assert (err.value.status, err.value.param) == (status, param), err.value.message
        return err.value

    job, options, urls = parse_chat_request({**ok, "n": 3, "logprobs": True, "top_logprobs": 2, "top_k": -1,
                                             "stop": "x", "stream": True, "stream_options": {"include_usage": True},
                                             "logit_bias": {"7": -5}, "min_tokens": 2}, cfg, ["m"])
    assert (job.n, job.sampling.top_logprobs, job.sampling.top_k, job.stop, job.sampling.logit_bias) == \
        (3, 2, 0, ["x"], {7: -5.0})
    assert options.stream and options.include_usage and urls == []
    refused({**ok, "max_tokens": 5.0}, "max_tokens")
    refused({**ok, "temperature": float("nan")}, "temperature")
    refused({**ok, "min_tokens": 33}, "min_tokens")
    refused({**ok, "n": 9}, "n")
    refused({**ok, "return_gates": True, "n": 2}, "n")
    refused({**ok, "messages": [{"role": "user", "content": []}]}, "messages[0].content")
    refused({**ok, "messages": [{"role": "user", "content": "x" * 101}]}, "messages")  # max_prompt_chars
    refused({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,", "detail": "high"}}]}]}, "messages[0].content[0].image_url")
    refused({**ok, "\ud800": 1}, "\\ud800").response()  # renders: no lone surrogate reaches the JSON encoder
    refused({**ok, "model": "other"}, "model", status=404)
    assert ServeConfig(max_prompt_tokens=10).prompt_char_limit == 160
    with pytest.raises(ApiError, match="nests too deeply"):
        parse_json(b"[" * 100_000)


def test_step_budget_and_kv_settings():
    cfg = ServeConfig.from_dict({"max_step_tokens": 64, "kv_cache_bytes": 2**30, "max_batch_size": 8})
    assert (cfg.max_step_tokens, cfg.kv_cache_bytes) == (64, 2**30)
    assert ServeConfig().max_step_tokens == 512 and ServeConfig().kv_cache_bytes is None
    with pytest.raises(ValueError, match="max_step_tokens=4 is below max_batch_size=8"):
        ServeConfig(max_step_tokens=4, max_batch_size=8)
    with pytest.raises(ValueError, match="kv_cache_bytes must be > 0 or null"):
        ServeConfig(kv_cache_bytes=0)
    with pytest.raises(ValueError, match="max_step_tokens must be > 0"):
        ServeConfig(max_step_tokens=0)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        ServeConfig.from_dict({"kv_cache_bytes": "lots"})
