"""`crosslayer serve` stops within 10 s of SIGTERM to its process group, idle or after streaming traffic (4
concurrent streaming requests of 300 tokens, finished), the repro of the hang it had after streaming."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def start_serve(tmp_path: Path) -> tuple[subprocess.Popen, int, Path, str]:
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CROSSLAYER_API_KEY")}
    env.update(RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--base", "tiny", "--include-base",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc, port, log, ray_tmp
        except OSError:
            time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"serve did not answer in 240 s:\n{log.read_text()[-3000:]}")


def stop_time(proc: subprocess.Popen) -> float:
    """SIGTERM the process group -> seconds until the command exited (SIGKILL and fail after 40 s)."""
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return float("inf")
    return time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("traffic", ["idle", "streaming"])
def test_serve_stops_within_10_s_of_sigterm(tmp_path, traffic):
    import openai

    proc, port, log, ray_tmp = start_serve(tmp_path)
    try:
        if traffic == "streaming":
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            done: list[tuple[str | None, int]] = []

            def ask(i: int) -> None:
                stream = client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"Tell me a long story {i}"}],
                    max_tokens=300, stream=True, extra_body={"min_tokens": 300})
                chunks, finish = 0, None
                for chunk in stream:
                    chunks += 1
                    finish = chunk.choices[0].finish_reason if chunk.choices else finish
                done.append((finish, chunks))

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=180)
            assert len(done) == 4 and all(f == "length" for f, _ in done), done  # all four streams finished
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    took = stop_time(proc)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert took <= 10.0, f"still running {took:.1f} s after SIGTERM:\n{log.read_text()[-3000:]}"
    assert "shutting down" in log.read_text()
