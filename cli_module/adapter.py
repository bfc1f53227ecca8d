"""Adapter I/O in PEFT's spirit: only the plug-in's weights (``adapter_model.safetensors``) plus a sorted,
indented ``adapter_config.json`` naming the base, the method, every CLIConfig field and the library version.

Loading checks the base's shape signature (hidden sizes, layer counts) before touching a weight, and reads
safetensors only: a ``.bin``/``.pt``/pickle file in the folder is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .bases import Base, load_base
from .config import CLIConfig
from .model import FusedVLM

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def base_signature(base: Base) -> dict[str, int]:
    """The shapes an adapter depends on; a different base with these equal is compatible."""
    return {"vision_hidden": base.vision_config.hidden_size, "vision_layers": base.num_vision_layers,
            "text_hidden": base.text_config.hidden_size, "text_layers": base.num_text_layers}


def library_version() -> str:
    try:
        return version("crosslayer")
    except PackageNotFoundError:
        return "unknown"


def save_adapter(model: FusedVLM, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None,
                 is_main_process: bool = True) -> Path:
    """Write weights and config atomically (temp file + rename); only the main process writes."""
    out = Path(out_dir)
    if not is_main_process:
        return out
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state_dict().items()}
    config = {"base_model": model.base.name, "base_revision": model.base.revision,
              "base_signature": base_signature(model.base), "cli_config": model.config.to_dict(),
              "method": model.config.method, "library": "crosslayer", "library_version": library_version(),
              "includes_projector": model.projector_modified, **(extra or {})}
    _atomic(out / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic(out / CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(adapter_dir)
    if not (d / CONFIG).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG}; point at a folder written by save_adapter / crosslayer train")
    return json.loads((d / CONFIG).read_text())


def load_adapter(adapter_dir: str | os.PathLike, base: Base | None = None) -> FusedVLM:
    """Rebuild the fused model from an adapter folder; loads the base named in it when none is given."""
    d = Path(adapter_dir)
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
    if pickles:
        raise ValueError(f"{d}: refusing pickle files {pickles}; adapters are loaded from {WEIGHTS} only "
                         f"(convert with safetensors.torch.save_file)")
    config = read_adapter_config(d)
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: no {WEIGHTS}")
    base = base if base is not None else load_base(config["base_model"])
    want, have = config["base_signature"], base_signature(base)
    diff = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    if diff:
        detail = ", ".join(f"{k}: adapter {a}, base {b}" for k, (a, b) in diff.items())
        raise ValueError(f"adapter {d} was trained on {config['base_model']!r}, which does not match base "
                         f"{base.name!r} ({detail}); load it with the base it was trained on")
    model = FusedVLM(base, CLIConfig.from_dict(config["cli_config"]))
    apply_adapter_state(model, load_file(str(d / WEIGHTS)), source=str(d))
    return model


def apply_adapter_state(model: FusedVLM, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy plug-in weights (and P's, under ``projector.``) into ``model``; every key must fit exactly."""
    proj = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    plug = {k: v for k, v in state.items() if not k.startswith("projector.")}
    own = dict(model.named_parameters())
    missing = sorted(k for k in own if not k.startswith("base_model.") and k not in plug)
    unknown = sorted(k for k in plug if k not in own)
    if missing or unknown:
        raise ValueError(f"{source}: weights do not fit method {model.config.method!r}: "
                         f"missing {missing[:5]}, unexpected {unknown[:5]}")
    with torch.no_grad():
        for k, v in plug.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
            own[k].copy_(v)
    if proj:  # a meta-device model (load_base(weights=False)) takes the small projector's tensors as they are
        model.base.projector.load_state_dict(proj, assign=next(model.base.projector.parameters()).is_meta)
        model.projector_modified = True


def load_projector(base: Base, adapter_dir: str | os.PathLike) -> None:
    """Two-stage recipe: P from a stage-1 (projector_ft) adapter replaces the base's, before the fused model is
    built (so input_fusion widens the trained P); mark the model ``projector_modified`` so its adapter carries P."""
    config = read_adapter_config(adapter_dir)
    if config["base_signature"] != base_signature(base):
        raise ValueError(f"init_projector {adapter_dir} was trained on {config['base_model']!r}, whose shapes "
                         f"{config['base_signature']} differ from this base's {base_signature(base)}")
    state = load_file(str(Path(adapter_dir) / WEIGHTS))
    proj = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    if not proj:
        raise ValueError(f"init_projector {adapter_dir} holds no projector.* weights (method "
                         f"{config.get('method')!r}); point it at a projector_ft adapter")
    base.projector.load_state_dict(proj)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
