"""``crosslayer submit {features|train|caption|eval} [--address URL] [options] -- ARGS``: run one of the
project's commands as a Ray job on a (remote) cluster through Ray's Job Submission API.

What it does, in order:
- checks ARGS locally with the subcommand's own argument parser (a typo fails here, not on the cluster;
  ``-- --help`` prints that help without submitting);
- builds the runtime environment: ``working_dir`` = this project's root (so the job runs the code you have,
  minus ``.venv``, ``.git`` and output folders; see ``DEFAULT_EXCLUDES``), merged with an optional
  ``--runtime-env`` YAML/JSON file and ``--env KEY=VALUE`` pairs;
- submits ``python -m jobs.cli SUB ARGS`` (the job's Python finds the package through the working dir,
  or through the installed package in the cluster image when ``--no-working-dir`` is given);
- prints the submission id as the first line of stdout, then (``--wait``, the default) follows the job's logs
  and exits with the job's status: 0 on SUCCEEDED; on FAILED the driver's exit code (1 if Ray has none), on
  STOPPED 1, each time with the last log lines and Ray's message on stderr. ``--no-wait`` exits 0 after
  submitting.

The address comes from ``--address``, else ``RAY_ADDRESS`` (as Ray's own CLI), else Ray's local discovery;
an explicit ``--address`` wins over the environment (Ray's client alone would prefer ``RAY_ADDRESS``).
Token authentication (Ray >= 2.52 clusters started with ``RAY_AUTH_MODE=token``, KubeRay ``authOptions``): unless
``RAY_AUTH_MODE=disabled``, the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
is sent as ``Authorization: Bearer`` (harmless for a cluster without authentication).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

SUBCOMMANDS = ("features", "train", "caption", "eval")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded with the working dir: environments, VCS data, caches and the usual output folders (data
# belongs in s3:// or on shared storage, not in the job package; Ray caps a working_dir at 500 MiB).
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache",
                    "out/", "report/", "runs/", "data/", "*.safetensors", "*.parquet", "*.gguf", "*.onnx"]
PROJECT_NAME = "crosslayer"
POLL_INTERVAL_S = 1.0  # status/log polling when the websocket log stream is unavailable


@dataclass
class Submission:
    """One ``crosslayer submit`` call, resolved."""

    command: str  # crosslayer subcommand run by the job (one of SUBCOMMANDS)
    args: list[str]  # that subcommand's own arguments
    address: str | None  # dashboard URL (http://HEAD:8265), ray:// address, "auto", or None: RAY_ADDRESS / local
    runtime_env: dict[str, Any] = field(default_factory=dict)  # passed to submit_job as is
    submission_id: str | None = None  # None: Ray picks raysubmit_<random>
    entrypoint_num_cpus: float | None = None  # resources reserved for the driver process (None: Ray's default, 0)
    entrypoint_num_gpus: float | None = None
    wait: bool = True  # follow the logs and exit with the job's status
    tail_lines: int = 30  # log lines repeated on stderr when the job did not succeed

    @property
    def entrypoint(self) -> str:
        return entrypoint(self.command, self.args)


# --- building the submission -------------------------------------------------------------------------

def entrypoint(command: str, args: list[str]) -> str:
    """The shell command the job runs; ``python -m`` so the working dir's copy of the package is imported."""
    return shlex.join(["python", "-m", "jobs.cli", command, *args])


def is_project_root(path: Path) -> bool:
    py = path / "pyproject.toml"
    if not (py.is_file() and (path / "jobs" / "cli.py").is_file()):
        return False
    return f'name = "{PROJECT_NAME}"' in py.read_text(errors="replace")


def find_project_root(start: Path | None = None) -> Path | None:
    """The crosslayer checkout holding ``start`` (default: the current directory), else the one this file
    lives in (an editable install), else None (an installed package: the cluster image must have it)."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents, Path(__file__).resolve().parents[1]):
        if is_project_root(candidate):
            return candidate
    return None


def load_runtime_env(path: str | None) -> dict[str, Any]:
    """A runtime-env file as ``ray job submit --runtime-env`` takes it (YAML, so JSON too)."""
    if not path:
        return {}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):  # ValueError: `crosslayer` reports those as one-line usage errors
        raise ValueError(f"{path}: a runtime env must be a mapping (working_dir, env_vars, pip, ...), "  # noqa: TRY004
                         f"got {type(data).__name__}")
    return data


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def build_runtime_env(base: dict[str, Any], working_dir: str | None, env: dict[str, str]) -> dict[str, Any]:
    """``base`` (from --runtime-env) plus the project's working dir (unless base names one or working_dir is
    None) with DEFAULT_EXCLUDES added to its excludes, plus env vars (--env wins over the file's)."""
    runtime_env = dict(base)
    if working_dir is not None and "working_dir" not in runtime_env:
        runtime_env["working_dir"] = working_dir
    if "working_dir" in runtime_env and "://" not in str(runtime_env["working_dir"]):
        runtime_env["excludes"] = list(dict.fromkeys([*runtime_env.get("excludes", []), *DEFAULT_EXCLUDES]))
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    return runtime_env


def check_job_args(command: str, args: list[str]) -> int | None:
    """Parse ``crosslayer COMMAND ARGS`` with the real parser, without running anything. None if they parse;
    else the exit code argparse chose (0 after --help, 2 on an error, which argparse has printed)."""
    from jobs.cli import build_parser

    try:
        build_parser().parse_args([command, *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return None


def auth_token() -> str | None:
    """The Ray auth token this client would use, in Ray's own order; None when RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file():
        return path.read_text().strip() or None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} does not exist")
    return None


@contextlib.contextmanager
def _explicit_address(address: str | None) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its ``address`` argument; an explicit
    --address must win, so hide them while the client resolves the address."""
    if address is None:
        yield
        return
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _explicit_address(address):
        return JobSubmissionClient(address, headers=headers)


# --- running it ----------------------------------------------------------------------------------------

def follow_logs(client: Any, job_id: str, out: TextIO) -> None:
    """Stream the job's logs until it ends: the websocket tail, else (a proxy that drops websockets, a broken
    stream) polling ``get_job_logs`` from where the stream stopped."""
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
        return
    except Exception as err:  # noqa: BLE001 - any transport failure: fall back to polling
        print(f"crosslayer submit: log stream interrupted ({type(err).__name__}: {err}); polling instead",
              file=sys.stderr)
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        out.write(logs[written:])
        out.flush()
        written = max(written, len(logs))
        if _status_name(status) in TERMINAL:
            return
        time.sleep(POLL_INTERVAL_S)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status)).rsplit(".", 1)[-1]


def wait_terminal(client: Any, job_id: str, timeout_s: float = 60.0) -> Any:
    """Job info once its status is terminal (the log stream can end a moment before the status flips)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if _status_name(info.status) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(POLL_INTERVAL_S / 2)


def exit_code(info: Any) -> int:
    status = _status_name(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if status == "FAILED" and isinstance(code, int) and code > 0 else 1


def run_submission(sub: Submission, client: Any | None = None, out: TextIO | None = None,
                   err: TextIO | None = None) -> int:
    """Submit, print the id, and (sub.wait) follow the logs; returns the process exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    client = client if client is not None else make_client(sub.address)
    job_id = client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env or None,
                               submission_id=sub.submission_id, entrypoint_num_cpus=sub.entrypoint_num_cpus,
                               entrypoint_num_gpus=sub.entrypoint_num_gpus)
    print(job_id, file=out, flush=True)
    where = getattr(client, "_address", sub.address)
    print(f"crosslayer submit: job {job_id} submitted to {where}: {sub.entrypoint}", file=err, flush=True)
    if not sub.wait:
        print(f"crosslayer submit: follow it with `ray job logs --follow {job_id} --address {where}`; "
              f"stop it with `ray job stop {job_id} --address {where}`", file=err)
        return 0
    try:
        follow_logs(client, job_id, out)
        info = wait_terminal(client, job_id)
    except KeyboardInterrupt:
        print(f"\ncrosslayer submit: stopped following; job {job_id} keeps running (`ray job stop {job_id} "
              f"--address {where}` stops it)", file=err)
        return 130
    status = _status_name(info.status)
    code = exit_code(info)
    if code:
        lines = client.get_job_logs(job_id).rstrip("\n").splitlines()[-sub.tail_lines:]
        message = (info.message or "").strip().splitlines()  # Ray appends the logs' tail: keep its first line
        print(f"crosslayer submit: job {job_id} {status}: {message[0] if message else ''}".rstrip(), file=err)
        if lines:
            print(f"--- last {len(lines)} log lines of {job_id} ---", file=err)
            print("\n".join(lines), file=err)
        print(f"crosslayer submit: exit code {code}", file=err, flush=True)
    else:
        print(f"crosslayer submit: job {job_id} {status}", file=err, flush=True)
    return code


# --- command line ----------------------------------------------------------------------------------------

def _options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The submit options: on the subcommand (before SUB) and re-parsed from what follows SUB (before --)."""
    parser.add_argument("--address", default=argparse.SUPPRESS,
                        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--runtime-env", default=argparse.SUPPRESS, metavar="FILE",
                        help="runtime env YAML/JSON (env_vars, pip, working_dir, excludes, ...) merged with the defaults")
    parser.add_argument("--working-dir", default=argparse.SUPPRESS,
                        help="folder uploaded as the job's working dir (default: this crosslayer checkout)")
    parser.add_argument("--no-working-dir", action="store_true", default=argparse.SUPPRESS,
                        help="upload nothing: run the crosslayer installed in the cluster's image")
    parser.add_argument("--env", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="environment variable for the job, repeatable (e.g. AWS_ENDPOINT_URL=...)")
    parser.add_argument("--submission-id", default=argparse.SUPPRESS, help="job id to use (default: Ray's)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=argparse.SUPPRESS,
                        help="CPUs reserved for the driver (default 0: it only coordinates)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=argparse.SUPPRESS)
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="follow the logs and exit with the job's status (default), or exit after submitting")
    parser.add_argument("--tail-lines", type=int, default=argparse.SUPPRESS,
                        help="log lines repeated on stderr when the job fails (default 30)")
    return parser


DEFAULTS: dict[str, Any] = {"address": None, "runtime_env": None, "working_dir": None, "no_working_dir": False,
                            "env": [], "submission_id": None, "entrypoint_num_cpus": None,
                            "entrypoint_num_gpus": None, "wait": True, "tail_lines": 30}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run features/train/caption/eval as a Ray job on a cluster (Job Submission API)",
        description="Submit `crosslayer SUB ARGS` as a Ray job with this checkout as its working dir, print the "
                    "submission id, follow the logs and exit with the job's status. Put SUB's own arguments "
                    "after --, e.g.: crosslayer submit train --address http://HEAD:8265 -- --config "
                    "configs/tiny.yaml trainer.max_steps=10")
    _options(p)
    p.add_argument("sub", choices=SUBCOMMANDS, metavar="SUB", help=f"one of {', '.join(SUBCOMMANDS)}")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="SUB's own arguments")
    p.set_defaults(func=_cmd)


def split_job_args(rest: list[str], given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """argparse hands everything after SUB over as is: submit options up to ``--``, SUB's arguments after it
    (without ``--``, submit options are picked out and the rest goes to SUB)."""
    options = _options(argparse.ArgumentParser(prog="crosslayer submit SUB", add_help=False, allow_abbrev=False))
    if "--" in rest:
        i = rest.index("--")
        ns = options.parse_args(rest[:i])
        job_args = rest[i + 1:]
    else:
        ns, job_args = options.parse_known_args(rest)
    return {**DEFAULTS, **given, **vars(ns)}, job_args


def _cmd(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    opts, job_args = split_job_args(args.job_args, given)
    code = check_job_args(args.sub, job_args)
    if code is not None:
        return code
    if opts["no_working_dir"]:
        working_dir = None
    elif opts["working_dir"]:
        working_dir = str(Path(opts["working_dir"]).resolve())
        if not Path(working_dir).is_dir():
            raise FileNotFoundError(f"--working-dir {opts['working_dir']}: no such folder")
    else:
        root = find_project_root()
        working_dir = str(root) if root else None
        if root is None:
            print("crosslayer submit: no crosslayer checkout here; the job runs the crosslayer installed in the "
                  "cluster's image", file=sys.stderr)
    runtime_env = build_runtime_env(load_runtime_env(opts["runtime_env"]), working_dir, parse_env(opts["env"]))
    address = opts["address"] or os.environ.get("RAY_ADDRESS") or None
    sub = Submission(command=args.sub, args=job_args, address=address, runtime_env=runtime_env,
                     submission_id=opts["submission_id"], entrypoint_num_cpus=opts["entrypoint_num_cpus"],
                     entrypoint_num_gpus=opts["entrypoint_num_gpus"], wait=opts["wait"],
                     tail_lines=opts["tail_lines"])
    try:
        return run_submission(sub)
    except (ConnectionError, RuntimeError) as err:
        print(f"crosslayer submit: cannot submit to {address or 'the local cluster'}: {err}\n"
              f"(token auth: export RAY_AUTH_TOKEN or keep the cluster's token in ~/.ray/auth_token)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - `crosslayer submit` is the entrypoint
    from jobs.cli import main

    sys.exit(main(["submit", *sys.argv[1:]]))
