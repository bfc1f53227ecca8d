"""Shared fixtures: tiny bases, a local Ray cluster (once per session), a moto S3 server."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture
def tiny_base():
    from cli_module.loading import load_base

    return load_base("tiny")


@pytest.fixture
def tiny_ov_base():
    from cli_module.loading import load_base

    return load_base("tiny-onevision")


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (16, 16)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220), "yellow": (225, 210, 30)}


def colour_images(folder, n: int, seed: int = 0) -> list[str]:
    """Write n 16x16 noisy solid-colour images, red, green, blue, yellow in turn, as folder/NN.png; -> their
    colour names (the answers of the colour questions the training tests ask)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = np.array(COLOURS[name])[None, None] + rng.integers(-40, 40, (16, 16, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
        names.append(name)
    return names


def perturb(model, std: float = 0.3, seed: int = 0) -> None:
    """Give every trainable weight a random non-zero value (so injection really changes the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; its endpoint is exported before Ray starts, so
    boto3, pyarrow and Ray Data workers all reach it through AWS_ENDPOINT_URL."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    # the venv's own server first: another moto_server on PATH (pyenv's 5.2.1 here) fails pyarrow's multipart uploads
    venv_exe = Path(sys.executable).parent / "moto_server"
    exe = str(venv_exe) if venv_exe.exists() else shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole test session (2 CPUs, small object store); S3 env already exported."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # the dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it a failed poll
    # can be read as a dead controller, and the run's placement group is removed under it
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=True, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the moto server."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
