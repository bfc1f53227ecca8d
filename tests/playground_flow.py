"""The playground's browser flow against a real ``crosslayer serve`` (a helper, not a test file).

``start_serve(args, env, log)`` runs the real command in a subprocess and waits for it; ``find_chromium()`` finds
Debian's chromium (``make browser`` installs it) or says why not; ``ask(page, ...)`` drives the page the way a
user does: image, question, Ask, wait for both answers and the gates.

Run as a script it takes the README's screenshot (the `small` base's quickstart adapters; `make quickstart` writes
them under report/work/):
    PYTHONPATH=. python tests/playground_flow.py --adapter cli=report/work/stage2/adapter \
        --adapter stage1=report/work/stage1/adapter --compare stage1 \
        --image pipelines/playground-page/examples/scene-2.png --question "Is the square striped or plain?" \
        --max-tokens 8 --out docs/images/playground.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_chromium() -> tuple[str | None, str]:
    """(executable, "") or (None, why not): $CROSSLAYER_CHROMIUM, else chromium on PATH; and Playwright's client."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "Playwright's Python client is not installed (pip install playwright==1.65.2; make browser)"
    exe = os.environ.get("CROSSLAYER_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not exe or not os.access(exe, os.X_OK):
        return None, ("no Chromium found (install Debian's chromium with `make browser`, or set CROSSLAYER_CHROMIUM "
                      "to a Chromium executable)")
    return exe, ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``crosslayer serve ARGS --port P`` in a subprocess; -> (process, base URL) once /healthz answers 200."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", **env}
    out = open(log, "wb")  # noqa: SIM115 (the process writes it until stop_serve)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", *args, "--port", str(port)], cwd=ROOT,
                            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"crosslayer serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    stop_serve(proc)
    raise RuntimeError(f"crosslayer serve did not answer /healthz within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_serve(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it (the command shuts Serve and Ray down); killed after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def launch(playwright, exe: str):
    return playwright.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])


def log_in(page, url: str, key: str):
    """Open the page: the first answer is the 401 page; type the key; -> that first response."""
    first = page.goto(url + "/")
    page.fill("#login-key", key)
    page.click("#login-button")
    page.wait_for_selector("#model option", state="attached")
    return first


def ask(page, image: Path | None, question: str, model: str | None = None, compare: str | None = None,
        max_tokens: int | None = None, timeout_ms: float = 120_000) -> None:
    """Pick the image (the file input, as an upload), type the question, Ask; wait until both answers ended."""
    if image is not None:
        page.set_input_files("#image-file", str(image))
        page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", question)
    if model is not None:
        page.select_option("#model", model)
    if compare is not None:
        page.select_option("#compare", compare)
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    page.click("#ask-button")
    page.wait_for_function("() => !document.getElementById('ask-button').disabled "
                           "&& !document.querySelector('.answer.streaming')", timeout=timeout_ms)


def main() -> int:
    p = argparse.ArgumentParser(description="take the playground screenshot against a real crosslayer serve")
    p.add_argument("--adapter", action="append", required=True, help="[ID=]DIR, as crosslayer serve takes it")
    p.add_argument("--compare", help="playground_compare: the served model id to answer beside")
    p.add_argument("--include-base", action="store_true")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--model", help="the model to pick (default: the page's default)")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--token", type=int, default=0, help="which generated token's heatmap to show")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    exe, why = find_chromium()
    if exe is None:
        print(why, file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    out = args.out.resolve()
    config = out.with_suffix(".serve.yaml")
    config.write_text(f"playground_compare: {args.compare}\n" if args.compare else "{}\n")
    serve_args = [a for entry in args.adapter for a in ("--adapter", entry)] + ["--config", str(config)]
    if args.include_base:
        serve_args.append("--include-base")
    key = "sk-playground-screenshot"
    proc, url = start_serve(serve_args, {"CROSSLAYER_API_KEY": key}, out.with_suffix(".serve.log"))
    try:
        with sync_playwright() as pw:
            browser = launch(pw, exe)
            page = browser.new_page(viewport={"width": 1280, "height": 600})  # full_page: as tall as the content
            log_in(page, url, key)
            ask(page, args.image, args.question, model=args.model, max_tokens=args.max_tokens)
            page.locator("#token-strip .tok").nth(args.token).click()
            page.screenshot(path=str(out), full_page=True)
            print(page.inner_text("#answer-main"), "|", page.inner_text("#answer-compare"))
            browser.close()
    finally:
        stop_serve(proc)
        config.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
