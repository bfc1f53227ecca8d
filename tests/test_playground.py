"""The web playground (pipelines/playground.py + pipelines/playground-page/): its routes, and the page in headless
Chromium (Debian's chromium driven by Playwright's Python client; skipped, with the reason, when either is missing),
against the tiny base plus two tiny adapters with an API key set, served by the application ``crosslayer serve``
builds (on the session's Ray) and, with ``-m slow``, by the command itself in a subprocess.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from email.message import Message
from fnmatch import fnmatch
from pathlib import Path

import pytest
from conftest import perturb, random_images
from playground_flow import ROOT, ask, find_chromium, free_port, launch, log_in, start_serve, stop_serve

KEY = "sk-playground-0123456789"
LIMITS = {"max_image_bytes": 4096, "max_body_bytes": 65536, "max_image_pixels": 128 * 128, "max_tokens": 16,
          "default_max_tokens": 8, "num_cpus": 0.5, "ingress_num_cpus": 0.1}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    small, big = folder / "small.png", folder / "big.png"
    random_images(1, seed=1)[0].save(small)
    random_images(1, seed=2, size=(64, 64))[0].save(big)  # ~12 KB of noise: over max_image_bytes=4096
    assert small.stat().st_size < LIMITS["max_image_bytes"] < big.stat().st_size
    return {"small": small, "big": big}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLI adapter (random, perturbed so its gates differ per token) and a projector_ft one (no gates)."""
    import torch

    from cli_module.adapter import save_adapter
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("adapters")
    configs = {"cli": CLIConfig(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4),
               "ptf": CLIConfig(method="projector_ft")}
    for name, cfg in configs.items():
        model = FusedVLM(load_base("tiny"), cfg)  # a fresh base each: projector_ft trains P in place
        perturb(model)
        save_adapter(model, root / name)
    return {name: root / name for name in configs}


@pytest.fixture(scope="module", params=["app", pytest.param("command", marks=pytest.mark.slow)])
def server(request, adapters, tmp_path_factory):
    """The tiny base as one-to-one plus the two adapters, an API key required. "app": the application
    ``crosslayer serve`` builds, run on the session's Ray (seconds); "command": the real ``crosslayer serve
    --adapter cli=DIR --adapter ptf=DIR --include-base`` in a subprocess with its own Ray, the key from $CROSSLAYER_API_KEY (slow)."""
    import yaml

    root = tmp_path_factory.mktemp("serve")
    if request.param == "command":
        (root / "serve.yaml").write_text(yaml.safe_dump(LIMITS))
        served = [a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]
        proc, url = start_serve([*served, "--include-base", "--config", str(root / "serve.yaml")],
                                {"CROSSLAYER_API_KEY": KEY}, root / "serve.log")
        yield url
        stop_serve(proc)
        return
    from ray import serve

    from pipelines.serve import app_builder

    request.getfixturevalue("ray_local")
    (root / "key").write_text(KEY)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    served = [f"{name}={path}" for name, path in adapters.items()]
    serve.run(app_builder({**LIMITS, "adapters": served, "include_base": True, "api_key_env": None,
                           "api_key_file": str(root / "key"), "require_api_key": True}),
              name="playground", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """-> (status, headers (case-insensitive), body)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def chat(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def image_message(path: Path, question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def test_routes_keep_the_page_and_its_data_behind_the_key(server):
    status, headers, body = get(f"{server}/")
    assert status == 401 and b'id="login-key"' in body and b'data-rejected="false"' in body
    assert headers["WWW-Authenticate"] == "Bearer" and "default-src 'self'" in headers["Content-Security-Policy"]
    status, _, body = get(f"{server}/", {"Cookie": "crosslayer_api_key=wrong"})
    assert status == 401 and b'data-rejected="true"' in body
    for auth in ({"Cookie": f"crosslayer_api_key={KEY}"}, {"Authorization": f"Bearer {KEY}"}):
        status, headers, body = get(f"{server}/", auth)
        assert status == 200 and b"/playground/playground.js" in body and headers["Cache-Control"] == "no-store"
    status, _, body = get(f"{server}/playground/info.json")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, body = get(f"{server}/playground/info.json", {"Authorization": f"Bearer {KEY}"})
    info = json.loads(body)
    assert status == 200 and info["models"] == ["tiny", "cli", "ptf"] and info["compare"] == info["base"] == "tiny"
    assert info["default_model"] == "cli" and info["key_required"] is True
    assert info["limits"]["max_tokens"] == 16 and info["limits"]["max_image_bytes"] == 4096
    assert info["examples"] == ["examples/scene-1.png", "examples/scene-2.png", "examples/scene-3.png"]
    assert get(f"{server}/playground/style.css")[0] == 200  # what the 401 page loads
    assert get(f"{server}/playground/login.js")[0] == 200
    assert get(f"{server}/playground/playground.js")[0] == 401
    status, headers, body = get(f"{server}/playground/examples/scene-1.png", {"Cookie": f"crosslayer_api_key={KEY}"})
    assert status == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    for name in ("../serve.py", "login.html", "index.html", "examples/../playground.js"):
        assert get(f"{server}/playground/{name}", {"Authorization": f"Bearer {KEY}"})[0] == 404, name
    # the API itself still takes the Bearer header only: the page's cookie opens the page, nothing else
    assert get(f"{server}/v1/models", {"Cookie": f"crosslayer_api_key={KEY}"})[0] == 401


def test_page_in_a_real_browser(server, images):
    exe, why = find_chromium()
    if exe is None:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    question = "What is in the picture?"
    want_main = chat(server, {"model": "cli", "messages": image_message(images["small"], question), "temperature": 0,
                              "max_tokens": 6, "return_gates": True})
    want_base = chat(server, {"model": "tiny", "messages": image_message(images["small"], question),
                              "temperature": 0, "max_tokens": 6})
    with sync_playwright() as pw:
        browser = launch(pw, exe)
        page = browser.new_page()
        sent: list[dict] = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/completions") else None)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        first = log_in(page, server, KEY)
        assert first.status == 401  # without the key, / is the 401 page
        options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert options == ["tiny", "cli", "ptf"] and page.input_value("#model") == "cli"
        assert page.input_value("#compare") == "tiny"
        assert page.get_attribute("#max-tokens", "max") == "16"  # the server's max_tokens

        # count the answer's text updates: a streamed answer arrives in pieces
        page.evaluate("""() => { window.pieces = 0; new MutationObserver(ms => { window.pieces += ms.length; })
                           .observe(document.querySelector('#answer-main .text'), {childList: true}); }""")
        ask(page, images["small"], question, max_tokens=6)
        assert page.text_content("#answer-main .text") == want_main["choices"][0]["message"]["content"]
        assert page.text_content("#answer-compare .text") == want_base["choices"][0]["message"]["content"]
        assert page.is_visible("#answer-compare") and "one-to-one" in page.text_content("#answer-compare h3")
        assert page.evaluate("window.pieces") >= 2
        assert [(r["model"], r["stream"], r.get("return_gates", False)) for r in sent] == [
            ("cli", True, True), ("tiny", True, False)]  # both in the same round, as streams
        assert page.is_hidden("#error")

        gates = want_main["gates"]  # (T, L=2, K=3)
        heat = page.locator("table#heatmap")
        assert heat.get_attribute("data-rows") == "2" and heat.get_attribute("data-cols") == "3"
        cells = page.eval_on_selector_all("#heatmap td.cell", "cs => cs.map(c => c.textContent)")
        assert cells == [f"{v:.2f}" for row in gates["values"][0] for v in row]
        assert page.locator("#token-strip .tok").count() == len(gates["values"])
        assert page.locator("#mean-gate rect.bar").count() == len(gates["values"])
        if len(gates["values"]) > 1:
            page.locator("#token-strip .tok").nth(1).click()
            cells = page.eval_on_selector_all("#heatmap td.cell", "cs => cs.map(c => c.textContent)")
            assert cells == [f"{v:.2f}" for row in gates["values"][1] for v in row]

        # a baseline adapter has no gates: it answers without them and the page says why
        ask(page, images["small"], question, model="ptf", max_tokens=3)
        assert page.is_hidden("#error") and page.text_content("#answer-main .model-name") == "ptf"
        assert "no gates: return_gates needs a CLI adapter" in page.text_content("#gates-note")
        assert page.locator("#heatmap td.cell").count() == 0
        page.select_option("#model", "cli")

        # the API's limits: the page refuses what the API would, and shows what the API refuses
        sent.clear()
        page.fill("#max-tokens", "17")
        page.click("#ask-button")
        assert "max tokens must be a whole number from 1 to 16" in page.text_content("#error") and not sent
        ask(page, images["big"], question, max_tokens=4)
        assert page.is_visible("#error")
        message = page.text_content("#error")
        assert "over max_image_bytes=4096" in message and message.count("\n") == 0  # one message for both
        assert "over max_image_bytes=4096" in page.text_content("#answer-main .text")

        page.fill("#image-url", "http://example.com/cat.png")  # a host not on image_url_allowlist (empty)
        ask(page, None, question, max_tokens=4)
        assert "'example.com' is not on this server's image_url_allowlist" in page.text_content("#error")
        page.locator("#examples .example").first.click()  # a bundled example replaces the URL
        page.wait_for_function("() => document.getElementById('image-info').textContent.includes('112×112')")
        assert page.input_value("#image-url") == ""

        # forgetting the key brings the 401 page back
        page.click("#forget-key")
        page.wait_for_selector("#login-key")
        assert not errors, errors
        browser.close()


def request(path: str = "/", headers: dict[str, str] | None = None, root_path: str = ""):
    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "GET", "path": path, "headers": raw, "root_path": root_path,
                    "query_string": b""})


def test_page_settings_prefix_and_off_switch():
    from pipelines import playground
    from pipelines.serve_api import ServeConfig

    on = ServeConfig(base="tiny", adapters=["a=/x/a", "b=/x/b"])
    resp = playground.page(request(root_path="/secure"), on, None)
    assert resp.status_code == 200 and b'data-root="/secure"' in resp.body
    assert b'src="/secure/playground/playground.js"' in resp.body
    info = playground.info(on, key_required=False)
    assert info["base"] is None and info["compare"] is None and info["default_model"] == "a"  # base not served
    info = playground.info(ServeConfig(base="tiny", adapters=["a=/x/a", "b=/x/b"], playground_compare="b"), False)
    assert info["compare"] == "b" and info["default_model"] == "a"
    # a key with characters a cookie cannot hold as they are: the page's script percent-encodes it
    assert playground.page(request(headers={"Cookie": "crosslayer_api_key=k%3By%25"}), on, "k;y%").status_code == 200
    off = ServeConfig(base="tiny", playground=False)
    for resp in (playground.page(request(), off, None), playground.asset("style.css", request(), off, None)):
        assert resp.status_code == 404 and b"playground: false" in resp.body
    from pipelines.serve import build_app

    with pytest.raises(ValueError, match="playground_compare='c' is not a served model id"):
        build_app(ServeConfig(base="tiny", adapters=["a=/x/a"], playground_compare="c"))


def test_every_page_file_ships_as_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipelines"]
    files = [p.relative_to(ROOT / "pipelines").as_posix() for p in (ROOT / "pipelines/playground-page").rglob("*")
             if p.is_file()]
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)
    for name in ("index.html", "login.html", "playground.js", "login.js", "style.css"):
        assert (ROOT / "pipelines/playground-page" / name).is_file()


def test_example_images_are_small_pngs():
    from PIL import Image

    for path in sorted((ROOT / "pipelines/playground-page/examples").glob("*.png")):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (112, 112)  # the small base's input size
        assert path.stat().st_size < 4096
