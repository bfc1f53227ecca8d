"""Derived bases: a base whose projector P and LLM were fine-tuned (LLaVA's visual instruction tuning, the
``instruct`` method), saved as the trained weights only, over the base they came from.

The paper's CLI sits on a *trained* VLM (LLaVA-1.5 after its stage 2, LLM included); ``method=instruct`` makes one
from any base, and this file is how the result becomes a base again (``--base DIR``) for CLI and its baselines.
The encoder is not touched, so a derived base reads the feature caches of the base it came from.

Folder layout (weights as safetensors, never pickle; files written to a temporary name, then renamed):
    DIR/crosslayer_derived.json   {"source", "source_revision", "weights_sha256", "tied", "method", "extra"}
    DIR/model.safetensors         projector.*, language_model.*, lm_head.* (a tied LM head is stored once)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from .bases import Base
from .files import atomic_write

DERIVED_FILE = "crosslayer_derived.json"
DERIVED_WEIGHTS = "model.safetensors"
FORMAT = 1


def trained_modules(base: Base) -> dict[str, nn.Module]:
    """The parts of a base that ``instruct`` trains and a derived base replaces (the encoder stays the source's)."""
    return {"projector": base.projector, "language_model": base.language_model, "lm_head": base.lm_head}


def derived_parameters(base: Base) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """-> (parameters by prefixed name, ties): a parameter shared by two names (a tied LM head) is kept under the
    first and recorded in ``ties`` as {second name: first name}."""
    params: dict[str, nn.Parameter] = {}
    ties: dict[str, str] = {}
    seen: dict[int, str] = {}
    for prefix, module in trained_modules(base).items():
        for name, p in module.named_parameters(remove_duplicate=False):
            key = f"{prefix}.{name}"
            if id(p) in seen:
                ties[key] = seen[id(p)]
                continue
            seen[id(p)] = key
            params[key] = p
    return params, ties


def save_derived(base: Base, out: str | Path, source: str, source_revision: str | None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``base``'s projector and LLM weights as a derived base of ``source`` (the weights file first, the
    json last: a folder with the json is complete)."""
    out = Path(out)
    params, ties = derived_parameters(base)
    data = save({k: p.detach().to("cpu").contiguous() for k, p in params.items()}, metadata={"format": "pt"})
    atomic_write(out / DERIVED_WEIGHTS, data)
    digest = hashlib.sha256(data).hexdigest()
    meta = {"format": FORMAT, "source": source, "source_revision": source_revision, "weights_sha256": digest,
            "tied": ties, "method": "instruct", "extra": dict(extra or {})}
    atomic_write(out / DERIVED_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return out


def is_derived(path: str | Path) -> bool:
    return Path(path, DERIVED_FILE).is_file()


def read_derived(path: str | Path) -> dict[str, Any]:
    meta = json.loads(Path(path, DERIVED_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: derived-base format {meta.get('format')!r}, this library reads {FORMAT}; "
                         f"retrain it with `crosslayer train method=instruct`")
    for key in ("source", "weights_sha256", "tied"):
        if key not in meta:
            raise ValueError(f"{path}/{DERIVED_FILE} lacks {key!r}; the folder is incomplete, retrain it")
    return meta


def apply_derived(base: Base, path: str | Path, meta: dict[str, Any], name: str, weights: bool = True) -> Base:
    """Put the derived folder ``path``'s weights into ``base`` (its source, freshly loaded; ``weights=False``: a
    meta-device or encoder-only load, no weight file read) and name the result ``name`` (the folder or s3://
    prefix it was loaded from); its encoder identity stays the source's, so the source's caches serve it."""
    path = Path(path)
    if weights:
        state = load_file(str(path / DERIVED_WEIGHTS))
        params, ties = derived_parameters(base)
        if ties != meta["tied"]:
            raise ValueError(f"{path}: tied weights {meta['tied']} differ from the source base's {ties}; load it "
                             f"over the base it was trained from")
        missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unknown:
            raise ValueError(f"{path}: weights do not fit source base {meta['source']!r}: missing {missing[:5]}, "
                             f"unexpected {unknown[:5]}; load it over the base it was trained from")
        with torch.no_grad():
            for key, tensor in state.items():
                if params[key].shape != tensor.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the source base's is "
                                     f"{tuple(params[key].shape)}")
                params[key].copy_(tensor.to(params[key].dtype))
    base.encoder_source = base.encoder_source or (base.name, base.revision)
    base.name, base.revision = name, meta["weights_sha256"][:16]
    return base
