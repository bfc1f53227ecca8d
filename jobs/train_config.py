"""Typed configuration of ``crosslayer train``: the YAML file, its dotted ``key=value`` overrides, and the
DeepSpeed config derived from it.

Sections (one dataclass each, a comment per field, checked in ``__post_init__`` with the numbers in the error):
``base``/``method``/``output_dir``/``init_projector`` at the top, ``cli`` (the plug-in's ``CLIConfig``),
``data``, ``trainer``, ``optim``, ``deepspeed`` and ``debug`` (fault-injection knobs for tests). Every key is
checked against the dataclass fields, in the YAML and in overrides alike: an unknown key fails with the bad key
and the valid ones, a value of the wrong type fails with the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cli_module.config import CLIConfig, Method

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]


@dataclass
class DataArgs:
    train: str = ""  # LLaVA-format JSONL of training conversations (local path or s3:// URI)
    eval: str | None = None  # held-out JSONL; when unset, eval_fraction of data.train is held out instead
    eval_fraction: float = 0.1  # share of data.train held out for evaluation when data.eval is unset (0 = none)
    features: str = ""  # feature cache (folder or s3:// prefix) built by `crosslayer features` for this base
    max_length: int | None = None  # longest sequence in tokens, image tokens included; None = min(2048, model max)
    skip_bad_rows: bool = False  # skip and count unusable rows instead of failing before training

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2 tokens, got {self.max_length}")


@dataclass
class TrainerArgs:
    num_workers: int = 2  # Ray Train workers, one data-parallel rank each
    use_gpu: bool = False  # one GPU per worker (CPU workers use gloo)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker; also the worker's torch thread count
    max_steps: int = 100  # optimizer steps in the whole run
    micro_batch_size: int = 4  # sequences per worker per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # seeds the plug-in's init, the rank split and every epoch's order
    log_every: int = 10  # steps between progress lines (and metric rows)
    eval_every: int = 50  # steps between evaluations of the held-out split (0 = only at the end)
    eval_batch_size: int = 8  # sequences per worker per evaluation forward
    checkpoint_every: int = 50  # steps between checkpoints (0 = only at the end)
    num_to_keep: int = 2  # checkpoints Ray Train keeps in storage
    max_failures: int = 0  # worker-group restarts from the newest checkpoint before the run fails (-1 = always)
    run_name: str | None = None  # Ray Train run name; reuse one to resume it; unset = a fresh name
    storage_path: str | None = None  # Ray Train storage (local folder or s3://); unset = <output_dir>/runs
    poll_interval_s: float = 0.5  # how often Ray Train's controller polls workers; reports wait for it (Ray: 2)

    def __post_init__(self) -> None:
        for name in ("num_workers", "max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_batch_size",
                     "num_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0 (0 = only at the end), got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ValueError(f"trainer.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.cpus_per_worker <= 0 or self.poll_interval_s <= 0:
            raise ValueError(f"trainer.cpus_per_worker ({self.cpus_per_worker}) and trainer.poll_interval_s "
                             f"({self.poll_interval_s}) must be > 0")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name):
            raise ValueError(f"trainer.run_name must be a non-empty name without '/', got {self.run_name!r}")


@dataclass
class OptimArgs:
    lr: float = 1e-4  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    schedule: Schedule = "cosine"  # decay after warmup: cosine, linear, or constant
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr over this many steps
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # global gradient-norm clipping (DeepSpeed gradient_clipping; 0 = off)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError(f"optim.weight_decay ({self.weight_decay}) and optim.grad_clip ({self.grad_clip}) must "
                             f"be >= 0 and optim.eps ({self.eps}) > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DeepSpeedArgs:
    zero_stage: int = 2  # ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+ gradients), 3 (+ parameters)
    precision: Precision = "fp32"  # fp32, bf16 (fp32 master weights), or fp16 (dynamic loss scaling)
    initial_scale_power: int = 16  # fp16 only: the dynamic loss scale starts at 2**this

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0 <= self.initial_scale_power <= 32:
            raise ValueError(f"deepspeed.initial_scale_power must be in [0, 32], got {self.initial_scale_power}")


@dataclass
class DebugArgs:
    crash_at_step: int | None = None  # rank 0 raises after this step, on an attempt that did not resume (tests)
    pid_dir: str | None = None  # each worker writes rank<r>.pid here (fault-injection tests)
    step_sleep_s: float = 0.0  # sleep after every step, to give a fault-injection test time to act

    def __post_init__(self) -> None:
        if self.crash_at_step is not None and self.crash_at_step < 1:
            raise ValueError(f"debug.crash_at_step must be >= 1, got {self.crash_at_step}")
        if self.step_sleep_s < 0:
            raise ValueError(f"debug.step_sleep_s must be >= 0, got {self.step_sleep_s}")


@dataclass
class TrainConfig:
    base: str = "tiny"  # base preset, hub id, folder or s3:// prefix (the one the feature cache was built with)
    method: Method | None = None  # cli or a baseline; when set it overrides cli.method
    output_dir: str = "out/train"  # adapter/, metrics.jsonl, loss.png, summary.json go here (local or s3://)
    init_projector: str | None = None  # adapter folder whose projector.* weights replace P (two-stage recipe)
    cli: CLIConfig = field(default_factory=CLIConfig)  # the plug-in's settings (CLIConfig fields)
    data: DataArgs = field(default_factory=DataArgs)  # conversations, feature cache, eval split, bad rows
    trainer: TrainerArgs = field(default_factory=TrainerArgs)  # workers, steps, batches, logging, checkpoints
    optim: OptimArgs = field(default_factory=OptimArgs)  # AdamW, schedule, clipping
    deepspeed: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)  # ZeRO stage and precision
    debug: DebugArgs = field(default_factory=DebugArgs)  # fault injection for tests

    def __post_init__(self) -> None:
        if self.method is not None and self.method != self.cli.method:
            self.cli = CLIConfig.from_dict({**self.cli.to_dict(), "method": self.method})
        self.method = self.cli.method
        if self.optim.warmup_steps > self.trainer.max_steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds trainer.max_steps "
                             f"({self.trainer.max_steps})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")


# --- loading: YAML + dotted overrides, every key checked ----------------------------------------------

def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or nothing) plus ``key=value`` overrides -> a validated TrainConfig."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return TrainConfig.from_dict(data)


def recipe_overrides(*, base: str, output_dir: str | Path, data_dir: str | Path, features: str | Path, steps: int,
                     lr: float, micro_batch: int, vision_layers: list[int], inject_layers: list[int], pool: int,
                     attn_dim: int, heads: int = 4, workers: int = 2, seed: int = 0, log_every: int = 10) -> list[str]:
    """Overrides of one run of the quickstart / quality-benchmark recipe: train.jsonl and val.jsonl of a synthetic
    set (``crosslayer data synth``), a feature cache, evaluation and checkpoint once at the end, warmup a tenth."""
    data_dir = Path(data_dir)
    return [f"base={base}", f"output_dir={output_dir}", f"data.train={data_dir / 'train.jsonl'}",
            f"data.eval={data_dir / 'val.jsonl'}", f"data.features={features}", f"trainer.max_steps={steps}",
            f"trainer.num_workers={workers}", f"trainer.micro_batch_size={micro_batch}", f"trainer.seed={seed}",
            f"trainer.log_every={log_every}", f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}",
            f"optim.lr={lr}", f"optim.warmup_steps={max(1, steps // 10)}",
            f"cli.vision_layers={json.dumps(vision_layers)}", f"cli.inject_layers={json.dumps(inject_layers)}",
            f"cli.pool={pool}", f"cli.attn_dim={attn_dim}", f"cli.heads={heads}"]


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested mapping; the value is YAML (``8``, ``[1, 2]``, ``null``) except for
    string fields, which take the text as it is."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. trainer.max_steps=10)")
    hint = field_hint(key)
    bare = _strip_optional(hint)
    if bare is str and text not in ("null", "~"):
        value: Any = text
    else:
        value = yaml.safe_load(text) if text else None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")  # noqa: TRY004 (a config error)
        node = child
    node[parts[-1]] = value


def field_hint(key: str) -> Any:
    """The type of a dotted key, or ValueError naming the unknown part and the valid keys there."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"unknown config key {key!r}: {'.'.join(parts[:i])} is not a section")
        hints = get_type_hints(cls)
        if part not in hints:
            raise ValueError(_unknown(".".join(parts[: i + 1]), cls, ".".join(parts[:i])))
        cls = hints[part]
    return cls


def _unknown(key: str, cls: Any, section: str) -> str:
    valid = sorted(f.name for f in dataclasses.fields(cls))
    where = f"under {section!r}" if section else "at the top level"
    return f"unknown config key {key!r}; valid keys {where} are {valid}"


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {data!r}")  # noqa: TRY004 (a config error)
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(_unknown(f"{prefix}{unknown[0]}", cls, prefix.rstrip(".")))
    values = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in data.items()}
    return cls(**values)


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and lightly convert) one value against its annotation; errors carry the key and the value."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(key, value, _strip_optional(hint))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    return value


# --- DeepSpeed --------------------------------------------------------------------------------------

def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run, every value explicit (no "auto"). The optimizer (AdamW over the
    trainable parameters) and the warmup + decay schedule are torch objects built from ``optim`` and handed to
    ``deepspeed.initialize``: an ``optimizer`` block would make DeepSpeed compile fused_adam first."""
    t, ds = cfg.trainer, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": ds.initial_scale_power},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, optim: OptimArgs, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based): linear warmup, then the decay."""
    import math

    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape
