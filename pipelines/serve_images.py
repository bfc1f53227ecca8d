"""Images of a chat request: ``data:`` URLs and allow-listed http(s) URLs -> decoded PIL images, within the limits,
with every failure a 4xx ``ApiError``.

- Decoding: the format and the size are read from the header first; one pixel rule with one status: an image
  over ``max_image_pixels`` is a 413, whether this server's check or Pillow's decompression-bomb guard sees it
  first (``ServeConfig`` keeps the limit at or below Pillow's). Anything Pillow cannot read is a 400.
- Fetching: the URL must be plain ``http(s)://host[:port]/path`` (no credentials, backslashes, spaces or
  non-ASCII), its host on ``image_url_allowlist``; the host is resolved once, every address checked (public
  only unless ``allow_private_image_hosts``) and the connection made to the checked address (no DNS rebinding
  between check and fetch); no redirects; only status 200; at most ``max_image_bytes``. ``image_fetch_timeout_s``
  is a total deadline (queueing, DNS, connect, status line, headers and body together): a timer closes the socket
  when it passes, so a server trickling one byte at a time cannot hold a fetch longer.
- ``ImageLoader`` runs this off the ingress's event loop: fetches on their own pool of ``image_fetch_workers``
  threads (slow hosts cannot starve request parsing), decoding on the ingress's parse pool.
"""

import asyncio
import base64
import binascii
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import images
from .serve_api import ApiError, ServeConfig

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # decoders an uploaded image may use
MAX_URL_CHARS = 8192
_NETLOC = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


def decode_image(raw: bytes, max_pixels: int) -> Any:
    """``pipelines.images.decode_image`` for a request: a PIL RGB image, 413 over the pixel limit, 400 for a format
    not accepted or anything Pillow cannot read."""
    try:
        return images.decode_image(raw, max_pixels, IMAGE_FORMATS)
    except images.ImageError as err:
        if err.problem == "too_large":
            raise ApiError(413, f"image is {err.pixels} pixels, over max_image_pixels={max_pixels}",
                           param="image_url", code="image_too_large") from None
        message = str(err) if err.problem == "format" else "image data is not a decodable image"
        raise ApiError(400, message, param="image_url", code="invalid_image") from None


def decode_data_url(url: str, cfg: ServeConfig) -> Any:
    """``data:image/...;base64,...`` -> a decoded PIL RGB image."""
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
    if len(raw) > cfg.max_image_bytes:
        raise ApiError(413, f"image is {len(raw)} bytes, over max_image_bytes={cfg.max_image_bytes}",
                       param="image_url", code="image_too_large")
    return decode_image(raw, cfg.max_image_pixels)


def is_fetched(url: str) -> bool:
    return url.split(":", 1)[0].lower() in ("http", "https")


def load_image(url: str, cfg: ServeConfig) -> Any:
    """A data: URL or an allow-listed http(s) URL -> a decoded PIL RGB image (blocking; ``ImageLoader`` is the
    ingress's non-blocking way)."""
    if url.startswith("data:"):
        return decode_data_url(url, cfg)
    if is_fetched(url):
        return decode_image(fetch_image(url, cfg), cfg.max_image_pixels)
    raise ApiError(400, "image_url must be a data: URL or an http(s) URL on the server's allowlist",
                   param="image_url", code="invalid_image_url")


def host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in allowlist)


@dataclass
class Target:
    """A checked image URL: where to connect and what to ask for."""

    scheme: str  # "http" or "https"
    host: str  # host name or IP literal (no brackets), checked against the allowlist
    port: int  # TCP port
    path: str  # path and query, as sent in the request line


def check_url(url: str, cfg: ServeConfig) -> Target:
    """Parse an http(s) image URL strictly and check its host against the allowlist (no network)."""

    def bad(why: str) -> ApiError:
        return ApiError(400, f"malformed image URL: {why}", param="image_url", code="invalid_image_url")

    if len(url) > MAX_URL_CHARS:
        raise bad(f"longer than {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c in url for c in "\\ \t\r\n") or any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise bad("it must be ASCII without spaces, control characters or backslashes (percent-encode them)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise bad(str(err)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad("the scheme must be http or https")
    if "@" in parts.netloc:
        raise bad("credentials (user@) are not allowed")
    if not _NETLOC.fullmatch(parts.netloc) or not parts.hostname:
        raise bad(f"host {parts.netloc!r} is not a host name or IP address with an optional port")
    host = parts.hostname
    if not host_allowed(host, cfg.image_url_allowlist):
        raise ApiError(400, f"image URL host {host!r} is not on this server's image_url_allowlist; send the image "
                            f"inline as a data: URL", param="image_url", code="image_url_not_allowed")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme=scheme, host=host, port=port or (443 if scheme == "https" else 80), path=path)


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address already resolved and checked; the Host header keeps the URL's name."""

    def __init__(self, target: Target, address: str, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address already resolved and checked; SNI and the certificate check use the URL's name."""

    def __init__(self, target: Target, address: str, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _Fetch:
    """One fetch; ``abort`` (from the deadline timer's thread) closes its socket so a blocked read returns."""

    def __init__(self, target: Target, cfg: ServeConfig, deadline: float):
        self.target, self.cfg, self.deadline = target, cfg, deadline
        self.conn: http.client.HTTPConnection | None = None
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()
        sock = self.conn.sock if self.conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.aborted.is_set():
            raise TimeoutError
        return left

    def resolve(self) -> str:
        target, cfg = self.target, self.cfg
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as err:
            raise ApiError(400, f"image URL host {target.host!r} does not resolve: {err}", param="image_url",
                           code="image_fetch_failed") from None
        addresses = [info[4][0] for info in infos]
        if not cfg.allow_private_image_hosts:
            for address in addresses:
                ip = ipaddress.ip_address(address.split("%")[0])
                if not ip.is_global:
                    raise ApiError(400, f"image URL host {target.host!r} resolves to non-public address {ip}",
                                   param="image_url", code="image_url_not_allowed")
        return addresses[0]

    def run(self) -> bytes:
        target, limit = self.target, self.cfg.max_image_bytes
        address = self.resolve()
        kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        self.conn = kind(target, address, timeout=self.remaining())
        try:
            if self.aborted.is_set():
                raise TimeoutError
            self.conn.request("GET", target.path, headers={"User-Agent": "crosslayer", "Accept": "image/*"})
            response = self.conn.getresponse()
            if response.status != 200:
                raise ApiError(400, f"image URL answered HTTP {response.status} (only 200 is followed; no "
                                    f"redirects)", param="image_url", code="image_fetch_failed")
            declared = response.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ApiError(413, f"image at URL is {declared} bytes, over max_image_bytes={limit}",
                               param="image_url", code="image_too_large")
            chunks, size = [], 0
            while size <= limit:
                self.remaining()
                chunk = response.read1(min(65536, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            self.conn.close()
        if size > limit:
            raise ApiError(413, f"image at URL is over max_image_bytes={limit}", param="image_url",
                           code="image_too_large")
        return b"".join(chunks)


def fetch_image(url: str, cfg: ServeConfig, deadline: float | None = None) -> bytes:
    """The bytes at an allow-listed http(s) URL, by ``deadline`` (monotonic; default now + image_fetch_timeout_s)."""
    target = check_url(url, cfg)
    deadline = deadline if deadline is not None else time.monotonic() + cfg.image_fetch_timeout_s
    fetch = _Fetch(target, cfg, deadline)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), fetch.abort)
    timer.daemon = True
    timer.start()
    try:
        return fetch.run()
    except ApiError:
        raise
    except Exception as err:  # noqa: BLE001 (socket, TLS, HTTP protocol and timeout errors: the URL's fault)
        if fetch.aborted.is_set() or isinstance(err, TimeoutError) or time.monotonic() >= deadline:
            raise _timeout(cfg) from None
        detail = str(err)[:200]
        raise ApiError(400, f"could not fetch image URL ({type(err).__name__}{': ' + detail if detail else ''})",
                       param="image_url", code="image_fetch_failed") from None
    finally:
        timer.cancel()


def _timeout(cfg: ServeConfig) -> ApiError:
    return ApiError(400, f"image URL did not deliver the image within image_fetch_timeout_s="
                         f"{cfg.image_fetch_timeout_s:g} s", param="image_url", code="image_fetch_timeout")


class ImageLoader:
    """A request's images, loaded without blocking the event loop: http(s) fetches on their own bounded pool with
    a total deadline (a fetch still queued when it passes is dropped), decoding on the given parse pool."""

    def __init__(self, cfg: ServeConfig, parse_pool: Executor):
        self.cfg, self.parse_pool = cfg, parse_pool
        self.fetch_pool = ThreadPoolExecutor(cfg.image_fetch_workers, thread_name_prefix="crosslayer-fetch")

    async def load(self, urls: list[str]) -> list[Any]:
        return [await self.load_one(url) for url in urls]

    async def load_one(self, url: str) -> Any:
        loop, cfg = asyncio.get_running_loop(), self.cfg
        if url.startswith("data:"):
            return await loop.run_in_executor(self.parse_pool, decode_data_url, url, cfg)
        if not is_fetched(url):
            raise ApiError(400, "image_url must be a data: URL or an http(s) URL on the server's allowlist",
                           param="image_url", code="invalid_image_url")
        check_url(url, cfg)  # refuse what is not allowed before taking a fetch slot
        deadline = time.monotonic() + cfg.image_fetch_timeout_s
        try:
            raw = await asyncio.wait_for(loop.run_in_executor(self.fetch_pool, fetch_image, url, cfg, deadline),
                                         timeout=cfg.image_fetch_timeout_s + 0.5)
        except TimeoutError:  # still queued behind other fetches (a running one ends by its own timer)
            raise _timeout(cfg) from None
        return await loop.run_in_executor(self.parse_pool, decode_image, raw, cfg.max_image_pixels)

    def close(self) -> None:
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
