"""Running crosslayer on a Ray cluster: ``crosslayer submit`` and plain ``ray job submit`` against a real Ray head,
``serve run`` of the project's Serve config, the KubeRay / cluster-launcher / Docker files checked against the CLI,
Ray Serve's schema, the autoscaler's schema and the installed Ray, and (slow) a multi-node training run that loses
a node and finishes from its checkpoint.

The head is a cluster of this module's own: ``ray start --head`` with free ports and a private ``--temp-dir``,
started and stopped by process id (never ``ray stop``, which kills every Ray on the machine, the test session's
in-process one included). Both sides run with ``RAY_AUTH_MODE=disabled`` except in the token-auth test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER = ROOT / "cluster"
IMAGE_ROOT = "/home/ray/crosslayer"  # where ./Dockerfile puts the project in the image
CLUSTER_FILES = sorted([*CLUSTER.rglob("*.yaml"), ROOT / "Dockerfile"])
KUBERAY = CLUSTER / "kuberay"
TRAIN_ENV = ["--env", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25"]  # the controller polls workers every 2 s otherwise


# --- helpers ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus whatever points at another Ray (RAY_ADDRESS from the session's ray.init) or
    changes the served API; the venv first on PATH, so `python` and `crosslayer` in job entrypoints resolve."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CROSSLAYER_API_KEY", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
    env.update(extra)
    return env


def stop_ray_under(temp_dir: str) -> None:
    """End the processes of the Ray cluster whose temp dir is ``temp_dir``: those naming it on their command
    line (GCS, raylet, dashboard, agents, monitors) and all their descendants (workers, job drivers)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(found.values()), timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@dataclass
class Head:
    gcs: str  # host:port, for ray.init / serve run
    dashboard: str  # http://127.0.0.1:port, for job submission
    temp_dir: str
    env: dict[str, str]


def start_head(env: dict[str, str], num_cpus: int = 2) -> Head:
    temp_dir = tempfile.mkdtemp(prefix="clray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dash = free_port()
    cmd = ["timeout", "--foreground", "120", str(BIN / "ray"), "start", "--head", f"--port={free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--num-cpus={num_cpus}", "--object-store-memory=300000000",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150,
                              check=False)
        assert proc.returncode == 0, f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        gcs = Path(temp_dir, "ray_current_cluster").read_text().strip()
        wait_http(f"http://127.0.0.1:{dash}/api/version", 60, any_answer=True)  # 401 with token auth: up
    except BaseException:
        stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return Head(gcs=gcs, dashboard=f"http://127.0.0.1:{dash}", temp_dir=temp_dir, env=env)


def stop_head(head: Head) -> None:
    stop_ray_under(head.temp_dir)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def wait_http(url: str, timeout_s: float, want: int = 200, any_answer: bool = False) -> bytes:
    """GET until the status is ``want`` (or, with any_answer, until any HTTP status comes back)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == want or any_answer:
                    return r.read()
                last = r.status
        except urllib.error.HTTPError as err:
            if any_answer:
                return b""
            last = err
        except OSError as err:
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer {want} within {timeout_s} s (last: {last})")


def crosslayer(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


# --- a real head, tiny data ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    h = start_head(clean_env())
    yield h
    stop_head(h)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cluster") / "synth"
    proc = crosslayer("data", "synth", "--out", str(out), "--n", "40", "--image-size", "32", env=clean_env())
    assert proc.returncode == 0, describe(proc)
    return out


@pytest.fixture(scope="module")
def feature_cache(head: Head, synth: Path) -> Path:
    """Built by a job submitted with Ray's own CLI: `ray job submit --working-dir . -- crosslayer features ...`
    (so `crosslayer` resolves in the job's environment and the working dir carries the code)."""
    cache = synth.parent / "cache"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
           "crosslayer", "features", str(synth / "images"), "--out", str(cache), "--base", "tiny",
           "--layers", "1", "2", "--batch-size", "20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, describe(proc)
    assert "features: 40 images encoded" in proc.stdout, describe(proc)
    return cache


def train_overrides(synth: Path, cache: Path, out: Path, steps: int = 4) -> list[str]:
    return [f"data.train={synth / 'train.jsonl'}", f"data.eval={synth / 'val.jsonl'}", f"data.features={cache}",
            f"output_dir={out}", f"trainer.max_steps={steps}", "trainer.log_every=2", f"trainer.eval_every={steps}",
            f"trainer.checkpoint_every={steps}", "optim.warmup_steps=1"]


# --- crosslayer submit / ray job submit against the head --------------------------------------------

def test_ray_job_submit_builds_feature_cache(feature_cache: Path) -> None:
    meta = json.loads((feature_cache / "cache.json").read_text())
    assert meta["key"]["base"] == "tiny" and meta["key"]["layers"] == [1, 2]
    assert sorted(feature_cache.glob("part-*.parquet"))


def test_submit_train_waits_and_writes_adapter(head: Head, synth: Path, feature_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    t0 = time.monotonic()
    proc = crosslayer("submit", "train", "--address", head.dashboard, *TRAIN_ENV, "--",
                      "--config", "configs/tiny.yaml", *train_overrides(synth, feature_cache, out), env=head.env)
    assert proc.returncode == 0, describe(proc)
    job_id = proc.stdout.splitlines()[0]
    assert re.fullmatch(r"raysubmit_\w+", job_id), describe(proc)
    assert f"job {job_id} SUCCEEDED" in proc.stderr
    assert "[train] done" in proc.stdout  # the job's logs were followed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    print(f"submit train: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_submit_failing_job_exits_nonzero_with_its_error(head: Head, tmp_path: Path) -> None:
    proc = crosslayer("submit", "features", "--address", head.dashboard, "--",
                      "/nonexistent/images", "--out", str(tmp_path / "cache"), env=head.env)
    assert proc.returncode == 2, describe(proc)  # the job's own exit code: crosslayer features' SourceError
    job_id = proc.stdout.splitlines()[0]
    assert f"job {job_id} FAILED" in proc.stderr, describe(proc)
    assert "/nonexistent/images: no such file or folder" in proc.stderr  # the last log lines, on stderr
    assert "exit code 2" in proc.stderr


def test_submit_checks_arguments_before_submitting(capsys: pytest.CaptureFixture) -> None:
    from jobs.cli import main

    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens: any submission attempt would fail
    assert main(["submit", "train", "--address", unreachable, "--", "--bogus"]) == 2
    out, err = capsys.readouterr()
    assert "crosslayer train" in err and "--config" in err and "raysubmit_" not in out
    assert main(["submit", "eval", "--address", unreachable, "--", "--help"]) == 0
    out, err = capsys.readouterr()
    assert "--features" in out and "raysubmit_" not in out


@pytest.mark.slow
def test_serve_run_config_answers(head: Head, tmp_path: Path) -> None:
    """`serve run cluster/serve/config.yaml` against the head; only the HTTP port differs (a free one)."""
    config = yaml.safe_load((CLUSTER / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", str(path), "--address", head.gcs], cwd=ROOT, env=head.env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        models = json.loads(wait_http(f"http://127.0.0.1:{port}/v1/models", 180))
        ids = [m["id"] for m in models["data"]]
        assert ids
        body = json.dumps({"model": ids[0], "messages": [{"role": "user", "content": "Say hi."}],
                           "max_tokens": 4}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
        assert b"/playground/playground.js" in wait_http(f"http://127.0.0.1:{port}/", 10)  # the playground, no key set
    except BaseException:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-5000:])
        raise
    finally:
        proc.send_signal(signal.SIGINT)  # serve run deletes its application on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_submit_with_token_auth(tmp_path: Path) -> None:
    """A head with RAY_AUTH_MODE=token: `crosslayer submit` sends the token from RAY_AUTH_TOKEN_PATH (or
    ~/.ray/auth_token) and the job runs; without a token the submission is refused."""
    token = tmp_path / "auth_token"
    token.write_text("crosslayer-test-token-0123456789abcdef")
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    h = start_head(env, num_cpus=1)
    try:
        client_env = clean_env(RAY_AUTH_TOKEN_PATH=str(token))
        del client_env["RAY_AUTH_MODE"]  # unset, as on a user's machine: the token is sent when one is found
        proc = crosslayer("submit", "features", "--address", h.dashboard, "--no-wait", "--",
                          "/nonexistent/images", "--out", str(tmp_path / "x"), env=client_env)
        assert proc.returncode == 0, describe(proc)
        assert re.fullmatch(r"raysubmit_\w+", proc.stdout.strip()), describe(proc)
        assert "ray job logs --follow" in proc.stderr
        refused = crosslayer("submit", "features", "--address", h.dashboard, "--no-wait", "--",
                             "/nonexistent/images", "--out", str(tmp_path / "x"), env=clean_env())  # disabled
        assert refused.returncode == 1, describe(refused)
        assert "raysubmit_" not in refused.stdout
        assert "token" in refused.stderr.lower()
    finally:
        stop_head(h)


@pytest.mark.slow
def test_ray_job_submit_plain_train(head: Head, synth: Path, feature_cache: Path, tmp_path: Path) -> None:
    """The README's plain form: `ray job submit --working-dir . -- crosslayer train --config ...`."""
    out = tmp_path / "train"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
           "crosslayer", "train", "--config", "configs/tiny.yaml", *train_overrides(synth, feature_cache, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, describe(proc)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# --- crosslayer submit without a cluster ---------------------------------------------------------------

@pytest.fixture
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobs.submit.POLL_INTERVAL_S", 0.01)


class FakeInfo:
    def __init__(self, status: str, code: int | None = None, message: str = "") -> None:
        self.status, self.driver_exit_code, self.message = status, code, message


class FakeClient:
    """Just enough of JobSubmissionClient; tail_job_logs fails, so the polling fallback runs."""

    _address = "http://fake:8265"

    def __init__(self, final: FakeInfo, logs: str) -> None:
        self.final, self.logs = final, logs
        self.submitted: list[dict[str, Any]] = []
        self.polls = 0

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        return "raysubmit_fake"

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        raise RuntimeError("websocket refused")
        yield ""  # pragma: no cover

    def get_job_status(self, job_id: str) -> str:
        self.polls += 1
        return self.final.status if self.polls > 1 else "RUNNING"

    def get_job_logs(self, job_id: str) -> str:
        return self.logs if self.polls > 1 else self.logs[:5]

    def get_job_info(self, job_id: str) -> FakeInfo:
        return self.final


@pytest.mark.parametrize("final,code", [(FakeInfo("SUCCEEDED", 0), 0), (FakeInfo("FAILED", 3, "boom"), 3),
                                        (FakeInfo("FAILED", None, "lost"), 1), (FakeInfo("STOPPED"), 1)])
def test_run_submission_exit_codes(final: FakeInfo, code: int, capsys: pytest.CaptureFixture,
                                   fast_polling: None) -> None:
    from jobs.submit import Submission, run_submission

    client = FakeClient(final, "line one\nline two\nTraceback: oops\n")
    sub = Submission(command="train", args=["--config", "c.yaml"], address=None, tail_lines=2)
    assert run_submission(sub, client=client, out=sys.stdout, err=sys.stderr) == code
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "raysubmit_fake"
    assert "line one\nline two\nTraceback: oops" in out  # every log line once, through the polling fallback
    assert client.submitted[0]["entrypoint"] == "python -m jobs.cli train --config c.yaml"
    if code:
        assert "--- last 2 log lines" in err and "Traceback: oops" in err
        assert final.status in err


def test_no_wait_returns_after_submitting(capsys: pytest.CaptureFixture) -> None:
    from jobs.submit import Submission, run_submission

    client = FakeClient(FakeInfo("FAILED", 1), "")
    assert run_submission(Submission("features", ["a", "--out", "b"], None, wait=False), client=client) == 0
    assert client.polls == 0
    assert capsys.readouterr().out.strip() == "raysubmit_fake"


def test_submit_arguments_and_runtime_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.cli import build_parser
    from jobs.submit import DEFAULT_EXCLUDES, DEFAULTS, build_runtime_env, find_project_root, split_job_args

    args = build_parser().parse_args(["submit", "train", "--address", "http://h:8265", "--no-wait", "--env",
                                      "A=1", "--", "--config", "x.yaml", "trainer.max_steps=3"])
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    opts, job = split_job_args(args.job_args, given)
    assert (opts["address"], opts["wait"], opts["env"], job) == ("http://h:8265", False, ["A=1"],
                                                                 ["--config", "x.yaml", "trainer.max_steps=3"])
    args = build_parser().parse_args(["submit", "--address", "a", "caption", "--", "imgs", "--out", "o"])
    opts, job = split_job_args(args.job_args, {k: v for k, v in vars(args).items() if k in DEFAULTS})
    assert opts["address"] == "a" and opts["wait"] and job == ["imgs", "--out", "o"]

    spec = tmp_path / "env.yaml"
    spec.write_text("env_vars: {A: file, B: file}\nexcludes: [big/]\npip: [rich]\n")
    from jobs.submit import load_runtime_env, parse_env

    env = build_runtime_env(load_runtime_env(str(spec)), str(ROOT), parse_env(["A=cli"]))
    assert env["working_dir"] == str(ROOT) and env["pip"] == ["rich"]
    assert env["env_vars"] == {"A": "cli", "B": "file"}
    assert env["excludes"][0] == "big/" and set(DEFAULT_EXCLUDES) <= set(env["excludes"])
    assert build_runtime_env({"working_dir": "s3://b/code.zip"}, str(ROOT), {}) == {"working_dir": "s3://b/code.zip"}
    assert "working_dir" not in build_runtime_env({}, None, {})
    monkeypatch.chdir(ROOT / "cluster")
    assert find_project_root() == ROOT
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_env(["novalue"])


def test_auth_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.submit import auth_token

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None


def test_explicit_address_wins_over_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.submit import _explicit_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with _explicit_address("http://127.0.0.1:8265"):
        assert "RAY_ADDRESS" not in os.environ
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


# --- the cluster files ----------------------------------------------------------------------------------

TEMPLATE_VARS = {"WORKERS": "8", "CONFIG": "train-llava-ov-0.5b.yaml"}  # rayjob-train.yaml's envsubst parameters


def load_docs(path: Path, **params: str) -> list[dict[str, Any]]:
    """A manifest's YAML documents after ``envsubst`` of TEMPLATE_VARS (overridden by ``params``)."""
    text = string.Template(path.read_text()).safe_substitute({**TEMPLATE_VARS, **params})
    return [d for d in yaml.safe_load_all(text) if d]


def kuberay(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p) if d.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayClusterSpec: RayCluster.spec, RayJob.spec.rayClusterSpec, RayService.spec.rayClusterConfig."""
    specs = [(f"{p.name}", d["spec"]) for p, d in kuberay("RayCluster")]
    specs += [(f"{p.name}", d["spec"]["rayClusterSpec"]) for p, d in kuberay("RayJob")]
    specs += [(f"{p.name}", d["spec"]["rayClusterConfig"]) for p, d in kuberay("RayService")]
    return specs


def serve_apps() -> dict[str, dict[str, Any]]:
    local = yaml.safe_load((CLUSTER / "serve" / "config.yaml").read_text())
    (_, service), = kuberay("RayService")
    return {"cluster/serve/config.yaml": local, "rayservice.yaml serveConfigV2": yaml.safe_load(
        service["spec"]["serveConfigV2"])}


def commands_in(path: Path) -> list[str]:
    """The crosslayer commands a file gives: RayJob entrypoints, and comment lines that start with
    `crosslayer ...` or with a `ray job submit ... -- crosslayer ...`."""
    found = []
    if path.suffix == ".yaml":
        found += [" ".join(d["spec"]["entrypoint"].split()) for d in load_docs(path) if d.get("kind") == "RayJob"]
    for line in path.read_text().splitlines():
        if path.suffix != ".md" and not line.lstrip().startswith("#"):
            continue  # in YAML and the Dockerfile, only comments (entrypoints are read above)
        text = line.strip().lstrip("#").strip()
        text = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", text)  # RAY_AUTH_MODE=token ray job submit ...
        if text.startswith("crosslayer "):
            found.append(text.split("  ")[0].split(" (")[0])
        elif text.startswith("ray job submit ") and " -- crosslayer " in text:
            found.append(text.split(" -- ", 1)[1])
    return found


def check_command(command: str) -> list[str]:
    """Parse `crosslayer ...` with the real parser (and the job's args of a `crosslayer submit`); train configs
    are loaded with their overrides. Returns the crosslayer argv that was checked."""
    from jobs.cli import build_parser
    from jobs.submit import DEFAULTS, split_job_args
    from jobs.train_config import load_config

    argv = shlex.split(command)
    assert argv[0] == "crosslayer", command
    args = build_parser().parse_args(argv[1:])
    if args.command == "submit":
        _, job = split_job_args(args.job_args, {k: v for k, v in vars(args).items() if k in DEFAULTS})
        argv = ["crosslayer", args.sub, *job]
        args = build_parser().parse_args(argv[1:])
    if args.command == "train":
        config = args.config.replace(IMAGE_ROOT + "/", "")
        assert (ROOT / config).is_file(), f"{command}: no {config} in the project (the image copies the project)"
        load_config(ROOT / config, args.overrides)
    return argv


def test_every_cluster_file_starts_with_the_command_that_uses_it() -> None:
    first = {p.relative_to(ROOT).as_posix(): p.read_text().splitlines()[0] for p in CLUSTER_FILES}
    for name, line in first.items():
        assert line.startswith("# ") and re.search(r"\b(kubectl|ray up|docker build|serve run|crosslayer)\b", line), \
            f"{name}: first line {line!r} should be a comment giving the command that uses the file"


def test_every_command_in_the_cluster_files_parses() -> None:
    checked: dict[str, list[list[str]]] = {}
    for path in [*CLUSTER_FILES, ROOT / "docs" / "cluster.md"]:
        for command in commands_in(path):
            checked.setdefault(path.name, []).append(check_command(command))
    for name in ("raycluster.yaml", "rayjob-features.yaml", "rayjob-train.yaml", "rayjob-caption.yaml", "aws.yaml"):
        assert checked.get(name), f"{name} gives no crosslayer command"
    subs = {argv[1] for cmds in checked.values() for argv in cmds}
    assert {"features", "train", "caption"} <= subs


def test_rayjobs_run_crosslayer_on_s3_and_clean_up() -> None:
    jobs = {p.name: d for p, d in kuberay("RayJob")}
    assert set(jobs) == {"rayjob-features.yaml", "rayjob-train.yaml", "rayjob-caption.yaml"}
    for name, job in jobs.items():
        spec = job["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "crosslayer" and name == f"rayjob-{argv[1]}.yaml"
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
        if name != "rayjob-train.yaml":  # the train job's paths are in its recipe (checked below)
            assert "s3://" in spec["entrypoint"], f"{name}: the job should read and write s3://"
        yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    # the cache the features job builds is the one the train job reads, for the same base, layers and pooling
    feats = check_command(" ".join(jobs["rayjob-features.yaml"]["spec"]["entrypoint"].split()))
    train = check_command(" ".join(jobs["rayjob-train.yaml"]["spec"]["entrypoint"].split()))
    from jobs.cli import build_parser
    from jobs.train_config import load_config

    f = build_parser().parse_args(feats[1:])
    t = build_parser().parse_args(train[1:])
    cfg = load_config(ROOT / t.config.replace(IMAGE_ROOT + "/", ""), t.overrides)
    assert (f.out, f.base, f.vision_layers, f.pool) == (cfg.data.features, cfg.base, cfg.cli.vision_layers, cfg.cli.pool)
    assert f.image_root == cfg.data.image_root and f.src.endswith(cfg.data.train.rsplit("/", 1)[-1])
    assert cfg.trainer.use_gpu and cfg.output_dir.startswith("s3://") and cfg.trainer.storage_path.startswith("s3://")
    assert cfg.data.train.startswith("s3://") and cfg.data.features.startswith("s3://")


def test_rayjob_train_takes_the_worker_count_and_recipe_as_parameters() -> None:
    path = KUBERAY / "rayjob-train.yaml"
    assert "${WORKERS}" in path.read_text() and "${CONFIG}" in path.read_text()
    for workers, config in (("2", "train-llava-1.5-7b.yaml"), ("16", "train-llava-ov-0.5b.yaml")):
        (job,) = load_docs(path, WORKERS=workers, CONFIG=config)
        argv = check_command(" ".join(job["spec"]["entrypoint"].split()))
        args = shlex.split(" ".join(job["spec"]["entrypoint"].split()))
        assert args[args.index("--config") + 1].endswith("/" + config)
        assert f"trainer.num_workers={workers}" in argv
        (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert group["replicas"] == group["maxReplicas"] == int(workers)


def test_raycluster_head_and_autoscaling_gpu_workers() -> None:
    (_, rc), = kuberay("RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 1
    assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for name, cluster_spec in cluster_specs():
        params = cluster_spec["headGroupSpec"]["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values must be strings"


def test_serve_configs_load_through_ray_serve_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import ServeConfig

    apps = {}
    for name, config in serve_apps().items():
        schema = ServeDeploySchema.model_validate(config)
        assert len(schema.applications) == 1, name
        (app,) = config["applications"]
        ServeConfig.from_dict(app.get("args") or {})  # every arg is a ServeConfig field with a valid value
        apps[name] = app
    local, service = apps.values()
    for key in ("name", "route_prefix", "import_path"):
        assert local[key] == service[key], key
    assert [d["name"] for d in local["deployments"]] == [d["name"] for d in service["deployments"]]
    missing = set(local["args"]) - set(service["args"])
    assert not missing, f"rayservice.yaml's serveConfigV2 lacks args {sorted(missing)} of cluster/serve/config.yaml"
    model = next(d for d in service["deployments"] if d["name"] == "VLMModel")
    assert model["autoscaling_config"]["max_replicas"] > model["autoscaling_config"]["min_replicas"]
    assert model["ray_actor_options"]["num_gpus"] == service["args"]["num_gpus"] >= 1
    assert serve_apps()["rayservice.yaml serveConfigV2"]["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_ray_version_matches_installed_everywhere() -> None:
    import ray

    version = ray.__version__
    pins = re.findall(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [version], f"pyproject.toml pins ray {pins}, installed {version}"
    for name, cluster_spec in cluster_specs():
        assert cluster_spec["rayVersion"] == version, name
    images: set[str] = set()
    for path in CLUSTER_FILES:
        text = path.read_text()
        for found in re.findall(r"rayproject/ray:([\d.]+)", text):
            assert found == version, f"{path.name}: rayproject/ray:{found}"
        for found in re.findall(r"ray(?:\[[^\]]*\])?==([\d.]+)", text):
            assert found == version, f"{path.name}: ray=={found}"
        for image in re.findall(r"image:\s*(\S*crosslayer\S*)", text):
            images.add(image)
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-py311-gpu$", (ROOT / "Dockerfile").read_text(),
                     re.MULTILINE)
    built = re.search(r"docker build -t (\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert images == {built}, f"manifests name {images}, the Dockerfile builds {built}"
    assert f"ray{version}" in built


def test_launcher_config_validates_against_ray_autoscaler_schema() -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    workers = [v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]]
    assert workers and all(w["min_workers"] < w["max_workers"] for w in workers)
    assert any(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)  # GPU instances
    assert "--autoscaling-config" in " ".join(raw["head_start_ray_commands"])


# --- several nodes on one machine (slow) ------------------------------------------------------------------

MULTINODE_SCRIPT = r'''
"""A head (0 CPUs) and two 1-CPU worker nodes (ray.cluster_utils.Cluster); a 2-worker `crosslayer train` run via
jobs.train's setup/train/finish; once a checkpoint exists, the node of rank 1 is removed and a fresh node added;
the run must finish from its checkpoint. Prints one JSON line ("RESULT {...}") for the test."""
import json, os, sys, threading, time
from pathlib import Path

import psutil
import ray
import ray._common.utils
import ray._private.utils

# Cluster() writes and deletes /tmp/ray/ray_current_cluster, which every plain ray.init() on this machine
# reads: leave it alone (other sessions run Ray here too).
ray._private.utils.write_ray_address = lambda *a, **k: None
ray._common.utils.reset_ray_address = lambda *a, **k: None
from ray.cluster_utils import Cluster

a = json.loads(sys.argv[1])
node_args = {"temp_dir": a["temp_dir"], "object_store_memory": 150 * 2**20}
cluster = Cluster(initialize_head=True, head_node_args={**node_args, "num_cpus": 0, "gcs_server_port": a["port"],
                  "dashboard_agent_listen_port": a["agent_port"], "include_dashboard": False})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=1, **node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False)
    from jobs.train import finish, setup, train
    from jobs.train_config import load_config

    cfg = load_config(a["config"], a["overrides"])
    s = setup(cfg)
    box = {}

    def run():
        try:
            box["result"] = train(s)
        except BaseException as err:
            box["error"] = repr(err)

    thread = threading.Thread(target=run)
    thread.start()

    def raylets():
        return {n.all_processes["raylet"][0].process.pid: n for n in [cluster.head_node, *cluster.worker_nodes]
                if n.all_processes.get("raylet")}

    def nodes_of(pids):
        by_raylet = raylets()
        out = {}
        for rank, pid in pids.items():
            parents = {p.pid for p in psutil.Process(pid).parents()}
            out[rank] = next(n.node_id for r, n in by_raylet.items() if r in parents)
        return out

    pid_dir = Path(json.loads(os.environ["CROSSLAYER_FAULTS"])["pid_dir"])
    run_dir = Path(s.storage_path) / s.run_name
    deadline = time.monotonic() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    ckpt_step = None
    # a checkpoint counts once Ray Train's controller has registered it (its snapshot names it): a checkpoint
    # folder alone may still miss a rank's report, and a restart would then not see it
    while time.monotonic() < deadline and thread.is_alive():
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            latest = None
        if latest and len(list(pid_dir.glob("rank*.pid"))) == 2:
            ckpt_step = latest["metrics"]["step"]
            break
        time.sleep(0.1)
    if ckpt_step is None:
        raise SystemExit(f"no registered checkpoint within 240 s: {box}")
    pids_before = {p.stem: int(p.read_text()) for p in pid_dir.glob("rank*.pid")}
    nodes_before = nodes_of(pids_before)
    victim = next(n for n in cluster.worker_nodes if n.node_id == nodes_before["rank1"])
    for p in pid_dir.glob("rank*.pid"):
        p.unlink()
    t_remove = time.monotonic()
    cluster.remove_node(victim)
    fresh = cluster.add_node(num_cpus=1, **node_args)
    nodes_after = None
    while thread.is_alive():  # the restarted group writes new pid files: place them while they run
        pids_after = {p.stem: int(p.read_text() or 0) for p in pid_dir.glob("rank*.pid")}
        if len(pids_after) == 2 and all(pids_after.values()):
            try:
                nodes_after = nodes_of(pids_after)
                break
            except (psutil.Error, StopIteration):
                pass
        time.sleep(0.1)
    thread.join(timeout=300)
    if thread.is_alive() or "error" in box:
        raise SystemExit(f"training did not finish after the node loss: {box}")
    summary = finish(s, box["result"])
    pids_after = {p.stem: int(p.read_text()) for p in pid_dir.glob("rank*.pid")}
    result = {"nodes_before": nodes_before, "nodes_after": nodes_after,
              "pids_before": pids_before, "pids_after": pids_after, "removed": victim.node_id,
              "added": fresh.node_id, "head": cluster.head_node.node_id, "ckpt_step_at_removal": ckpt_step,
              "recovery_s": round(time.monotonic() - t_remove, 1), "summary": summary}
    time.sleep(1.0)  # let the workers' last log lines reach this driver
    print("RESULT " + json.dumps(result), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


@pytest.mark.slow
def test_multinode_training_spreads_and_survives_node_loss(synth: Path, feature_cache: Path, tmp_path: Path) -> None:
    """Needs the feature cache (built on the module's head), then runs a Cluster of its own in a subprocess:
    a ray.cluster_utils.Cluster cannot share a process with the session's in-process Ray."""
    out, pid_dir = tmp_path / "train", tmp_path / "pids"
    steps = 16
    overrides = [*train_overrides(synth, feature_cache, out, steps=steps), "trainer.num_workers=2",
                 "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.max_failures=2"]
    temp_dir = tempfile.mkdtemp(prefix="clmn-", dir="/tmp")
    script = tmp_path / "multinode.py"
    script.write_text(MULTINODE_SCRIPT)
    spec = {"temp_dir": temp_dir, "port": free_port(), "agent_port": free_port(),
            "config": str(ROOT / "configs" / "tiny.yaml"), "overrides": overrides}
    env = clean_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", PYTHONPATH=str(ROOT),
                    CROSSLAYER_FAULTS=json.dumps({"pid_dir": str(pid_dir), "step_sleep_s": 0.4}))
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
    finally:
        stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, describe(proc)
    r = json.loads(lines[-1][len("RESULT "):])
    before = r["nodes_before"]
    assert before["rank0"] != before["rank1"], f"both workers on one node: {r}"
    assert r["head"] not in before.values()
    assert r["pids_after"] and r["pids_after"] != r["pids_before"]  # the worker group was restarted
    after = r["nodes_after"]
    assert after and after["rank0"] != after["rank1"], r
    assert r["removed"] not in after.values() and r["added"] in after.values(), r
    assert r["summary"]["steps"] == steps
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # resumed, not restarted: the new rank 0 logs no step at or before the checkpoint that existed at the loss
    new_rank0 = r["pids_after"]["rank0"]
    pattern = rf"pid={new_rank0}\b.*?\[train\] step (\d+)/{steps}"
    logged = [int(m.group(1)) for m in re.finditer(pattern, proc.stdout)]
    assert logged and min(logged) > r["ckpt_step_at_removal"], (logged, r["ckpt_step_at_removal"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, steps + 1))
    print(f"multinode: {time.monotonic() - t0:.1f} s, recovery {r['recovery_s']} s")
