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
    from cli_module.bases import load_base

    return load_base("tiny")


@pytest.fixture
def tiny_ov_base():
    from cli_module.bases import load_base

    return load_base("tiny-onevision")


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (16, 16)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def perturb(model, std: float = 0.3, seed: int = 0) -> None:
    """Give every trainable weight a random non-zero value (so injection really changes the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)
