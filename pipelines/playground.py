"""The web playground: a static page at ``/`` of the serving app that asks the OpenAI-compatible API about an
image and draws the AGF gates of the answer (``ServeConfig.playground``, on by default).

What it serves (the routes live on ``OpenAIIngress``; everything they answer is built here):
  GET /                          pipelines/playground-page/index.html (401 page asking for the key when one is set
                                 and the request has none)
  GET /playground/info.json      what the page needs to know: model ids, the model it compares against, the API's
                                 limits, the bundled example images (behind the key)
  GET /playground/{file}         the page's script and examples (behind the key); ``style.css`` and ``login.js``
                                 are public, the 401 page needs them

The page itself (HTML + vanilla JS + CSS, no build step) calls the API as any client does: per question two
``POST /v1/chat/completions`` with ``stream: true`` at once, the chosen model's with ``return_gates: true`` (asked
again without when the model has no gates, e.g. a baseline adapter) and the comparison model's (``playground_compare``,
else the bare base when it is served), and draws the gates it gets back.

The API key: the 401 page stores the key the user types in the browser (``localStorage``, sent as ``Authorization:
Bearer`` on every API call) and in a ``SameSite=Strict`` cookie (``crosslayer_api_key``) that only the page's own
routes read; the API routes still take the Bearer header only. Nothing here puts the key into a URL or a page.
The example images are ``crosslayer data synth`` scenes at 112 px (seeds 3, 11, 27).
"""

import hmac
import html
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .serve_api import ApiError, ServeConfig

FILES = Path(__file__).with_name("playground-page")  # the page's files (package data)
COOKIE = "crosslayer_api_key"
PUBLIC = {"style.css", "login.js"}  # what the 401 page loads before it has a key
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
# the page runs only its own files; images may be data:/blob: URLs (uploads, pastes)
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                      "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
TEMPERATURE_RANGE = (0.0, 2.0)  # = SamplingParams' check


def _files() -> dict[str, Path]:
    """Every file the page may load, by its name under /playground/ (a fixed set: no path comes from a request)."""
    found = {p.name: p for p in FILES.glob("*") if p.is_file() and p.suffix in TYPES}
    found |= {f"examples/{p.name}": p for p in sorted(FILES.glob("examples/*.png"))}
    return found


def _authorized(request: Request, api_key: str | None) -> bool:
    """No key configured, or the request carries it (Bearer header or the page's cookie)."""
    if api_key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    offered = token.strip() if scheme.lower() == "bearer" else unquote(request.cookies.get(COOKIE, ""))
    return hmac.compare_digest(offered.encode(), api_key.encode())


def _root(request: Request) -> str:
    """The application's route prefix ("" at /), so the page's URLs work under any prefix."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _disabled() -> ApiError:
    return ApiError(404, "the playground is turned off on this server (ServeConfig playground: false)",
                    code="not_found")


def page(request: Request, cfg: ServeConfig, api_key: str | None) -> Response:
    """GET /: the playground, or a 401 page that asks for the API key."""
    if not cfg.playground:
        return _disabled().response()
    root = html.escape(_root(request), quote=True)
    if not _authorized(request, api_key):
        rejected = COOKIE in request.cookies or "authorization" in request.headers
        body = (FILES / "login.html").read_text().replace("{{ROOT}}", root).replace(
            "{{REJECTED}}", "true" if rejected else "false")
        return HTMLResponse(body, status_code=401, headers={**HEADERS, "WWW-Authenticate": "Bearer"})
    body = (FILES / "index.html").read_text().replace("{{ROOT}}", root)
    return HTMLResponse(body, headers=HEADERS)


def asset(name: str, request: Request, cfg: ServeConfig, api_key: str | None) -> Response:
    """GET /playground/{name}: one of the page's files, or info.json."""
    if not cfg.playground:
        return _disabled().response()
    files = _files()
    if name != "info.json" and name not in files:
        return ApiError(404, f"no playground file {name!r}", code="not_found").response()
    if name not in PUBLIC and not _authorized(request, api_key):
        return ApiError(401, "missing or invalid API key; open the playground page and enter it",
                        code="invalid_api_key").response()
    if name == "info.json":
        return JSONResponse(info(cfg, api_key is not None), headers=HEADERS)
    path = files[name]
    return Response(path.read_bytes(), media_type=TYPES[path.suffix], headers=HEADERS)


def info(cfg: ServeConfig, key_required: bool) -> dict[str, Any]:
    """What the page shows and checks before it asks: models, the comparison model, the API's limits."""
    ids = cfg.model_ids
    base = cfg.base_id if cfg.base_id in ids and (cfg.include_base or not cfg.adapters) else None
    compare = cfg.playground_compare or base
    return {"models": ids, "base": base, "compare": compare,
            "default_model": next((m for m in ids if m != compare), ids[0]), "key_required": key_required,
            "limits": {"max_tokens": cfg.max_tokens, "default_max_tokens": cfg.default_max_tokens,
                       "temperature": list(TEMPERATURE_RANGE), "max_image_bytes": cfg.max_image_bytes,
                       "max_image_pixels": cfg.max_image_pixels, "max_body_bytes": cfg.max_body_bytes,
                       "max_prompt_chars": cfg.prompt_char_limit, "max_images": cfg.max_images},
            "examples": [n for n in _files() if n.startswith("examples/")]}

