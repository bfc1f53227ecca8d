"""Adapters in PEFT's spirit: a typed ``AdapterConfig`` (``adapter_config.json``, sorted and indented: the base,
its shape signature, the method, every CLIConfig field, the library version, and what training recorded) plus
only the plug-in's weights (``adapter_model.safetensors``).

One API for every caller: ``read_adapter_config(path)``, ``save_adapter(model, path)``, ``load_adapter(path,
base)`` and ``load_model(adapter, base)`` (an adapter over its base, or the bare base as ``one_to_one``). Loading
checks the base's shape signature before touching a weight and reads safetensors only: a ``.bin``/``.pt``/pickle
file in the folder is refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .bases import Base
from .config import CLIConfig
from .files import atomic_write
from .loading import load_base
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


@dataclass
class AdapterConfig:
    """What ``adapter_config.json`` holds; the file is this dataclass, flat, with ``extra`` merged in."""

    base_model: str  # the base it was trained on: preset, hub id, folder or s3:// prefix
    base_signature: dict[str, int]  # shapes the weights depend on (see base_signature)
    cli_config: CLIConfig  # every plug-in setting
    base_revision: str | None = None  # hub revision or content hash of the base
    includes_projector: bool = False  # the weights carry P (projector_ft, or a stage-1 P under another method)
    library: str = "crosslayer"  # writer
    library_version: str = "unknown"  # writer's version
    extra: dict[str, Any] = field(default_factory=dict)  # what training recorded: train_step, run_name, ...

    @property
    def method(self) -> str:
        return self.cli_config.method

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        clash = sorted(set(self.extra) & (set(fields) | {"method"}))
        if clash:
            raise ValueError(f"adapter extra keys {clash} would overwrite the adapter's own fields; rename them")
        return {**fields, "cli_config": self.cli_config.to_dict(), "method": self.method, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter") -> AdapterConfig:
        missing = sorted({"base_model", "base_signature", "cli_config"} - set(data))
        if missing:
            raise ValueError(f"{source}: {CONFIG} lacks {missing}; it was not written by crosslayer's save_adapter")
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in data.items() if k in own and k != "cli_config"},
                  cli_config=CLIConfig.from_dict(data["cli_config"]),
                  extra={k: v for k, v in data.items() if k not in own and k != "method"})
        if data.get("method", cfg.method) != cfg.method:
            raise ValueError(f"{source}: method {data['method']!r} differs from cli_config.method {cfg.method!r}")
        return cfg


def save_adapter(model: FusedVLM, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None,
                 is_main_process: bool = True) -> Path:
    """Write weights and config atomically (temp file + rename); only the main process writes."""
    out = Path(out_dir)
    if not is_main_process:
        return out
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state_dict().items()}
    config = AdapterConfig(base_model=model.base.name, base_revision=model.base.revision,
                           base_signature=base_signature(model.base), cli_config=model.config,
                           includes_projector=model.projector_modified, library_version=library_version(),
                           extra=dict(extra or {}))
    atomic_write(out / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(out / CONFIG, (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> AdapterConfig:
    d = Path(adapter_dir)
    if not (d / CONFIG).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG}; point at a folder written by save_adapter / crosslayer train")
    return AdapterConfig.from_dict(json.loads((d / CONFIG).read_text()), source=str(d))


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
    base = base if base is not None else load_base(config.base_model)
    want, have = config.base_signature, base_signature(base)
    diff = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    if diff:
        detail = ", ".join(f"{k}: adapter {a}, base {b}" for k, (a, b) in diff.items())
        raise ValueError(f"adapter {d} was trained on {config.base_model!r}, which does not match base "
                         f"{base.name!r} ({detail}); load it with the base it was trained on")
    model = FusedVLM(base, config.cli_config)
    apply_adapter_state(model, load_file(str(d / WEIGHTS)), source=str(d))
    return model


def load_model(adapter: str | os.PathLike | None, base: str | None = None, weights: bool = True,
               dtype: torch.dtype = torch.float32, shared: Base | None = None) -> tuple[FusedVLM, str]:
    """-> (fused model, model id). An adapter over its base (or ``base``, when given), or with no adapter the base
    as is (``one_to_one``, id ``base:<name>``). ``weights=False`` builds it on the meta device from configs (the
    adapter is still read and checked): what a driver needs to fail fast. ``shared``: an already loaded base to
    reuse, unless the adapter carries its own projector, which would overwrite the shared one in place, or its
    method inserts modules into the base (llm_lora)."""
    if adapter is None:
        if base is None and shared is None:
            raise ValueError("give an adapter folder, or a base to use as is")
        b = shared if shared is not None else load_base(base, dtype=dtype, weights=weights)
        return FusedVLM(b, CLIConfig(method="one_to_one")), f"base:{base or b.name}"
    config = read_adapter_config(adapter)
    from .methods import method_class

    if shared is None or config.includes_projector or method_class(config.method).modifies_base:
        shared = load_base(base or config.base_model, dtype=dtype, weights=weights)
    return load_adapter(adapter, base=shared), str(adapter).rstrip("/").rsplit("/", 1)[-1]


def apply_adapter_state(model: FusedVLM, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy plug-in weights (and P's, under ``projector.``) into ``model``; every key must fit exactly."""
    proj = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    plug = {k: v for k, v in state.items() if not k.startswith("projector.")}
    own = {**dict(model.named_parameters()), **model.method.base_parameters(model)}  # llm_lora's under llm_lora.
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
    if config.base_signature != base_signature(base):
        raise ValueError(f"init_projector {adapter_dir} was trained on {config.base_model!r}, whose shapes "
                         f"{config.base_signature} differ from this base's {base_signature(base)}")
    state = load_file(str(Path(adapter_dir) / WEIGHTS))
    proj = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    if not proj:
        raise ValueError(f"init_projector {adapter_dir} holds no projector.* weights (method "
                         f"{config.method!r}); point it at a projector_ft adapter")
    base.projector.load_state_dict(proj)
