"""Typed configuration of ``crosslayer train``: the YAML file, its dotted ``key=value`` overrides, and the
DeepSpeed config derived from it.

Sections (one dataclass each, a comment per field, checked in ``__post_init__`` with the numbers in the error):
``base``/``method``/``output_dir``/``init_projector`` at the top, ``cli`` (the plug-in's ``CLIConfig``),
``data``, ``trainer``, ``optim`` and ``deepspeed`` (fault injection for tests lives in ``jobs.faults``). Every key is
checked against the dataclass fields by ``pipelines.typed_config`` (the engine ServeConfig shares), in the YAML and
in overrides alike: an unknown key fails with the bad key and the valid ones, a value of the wrong type fails with
the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cli_module.config import CLIConfig, Method
from pipelines.typed_config import apply_override, build, read_yaml_mapping

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]


@dataclass
class DataArgs:
    train: str = ""  # LLaVA-format JSONL of training conversations (local path or s3:// URI)
    eval: str | None = None  # held-out JSONL; when unset, eval_fraction of data.train is held out instead
    eval_fraction: float = 0.1  # share of data.train held out for evaluation when data.eval is unset (0 = none)
    image_root: str | None = None  # folder or s3:// prefix the records' image paths are relative to; None = the
    #                                data file's folder (LLaVA's 665K mix: the folder holding coco/, gqa/, ...)
    features: str | None = None  # feature cache (folder / s3://) built by `crosslayer features`; unset = encode on the fly
    max_length: int | None = None  # longest sequence in tokens, image tokens included; longer ones are cut at the
    #                                end (answers kept where possible); None = min(2048, model max)
    skip_bad_rows: bool = False  # skip and count unusable rows instead of failing before training
    token_cache: bool = True  # keep tokenised data in <output_dir>/token-cache/ and reuse it (resumes, reruns)
    tokenize_chunk: int = 2000  # records per parallel tokenising task (one chunk: tokenised on the driver)

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.tokenize_chunk < 1:
            raise ValueError(f"data.tokenize_chunk must be >= 1, got {self.tokenize_chunk}")
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
    gate_lr_scale: float = 1.0  # learning rate of AGF's gate controller (gate_proj, gate_bias), times lr
    out_lr_scale: float = 1.0  # learning rate of AGF's output map W_o (out_proj), times lr
    lm_lr_scale: float = 1.0  # methods instruct and llm_lora: learning rate of the LLM's weights (P keeps lr), times lr

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
        if min(self.gate_lr_scale, self.out_lr_scale, self.lm_lr_scale) <= 0:
            raise ValueError(f"optim.gate_lr_scale ({self.gate_lr_scale}), optim.out_lr_scale ({self.out_lr_scale}) "
                             f"and optim.lm_lr_scale ({self.lm_lr_scale}) must be > 0")


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
class TrainConfig:
    base: str = "tiny"  # base preset, hub id, folder or s3:// prefix (the one the feature cache was built with)
    method: Method = "cli"  # cli, a baseline, or instruct (cli_module/methods); the one place a recipe sets it
    output_dir: str = "out/train"  # adapter/ (instruct: model/), metrics.jsonl, loss.png, summary.json (or s3://)
    init_projector: str | None = None  # adapter folder whose projector.* weights replace P (two-stage recipe)
    cli: CLIConfig = field(default_factory=CLIConfig)  # the plug-in's settings (CLIConfig fields)
    data: DataArgs = field(default_factory=DataArgs)  # conversations, feature cache, eval split, bad rows
    trainer: TrainerArgs = field(default_factory=TrainerArgs)  # workers, steps, batches, logging, checkpoints
    optim: OptimArgs = field(default_factory=OptimArgs)  # AdamW, schedule, clipping
    deepspeed: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)  # ZeRO stage and precision

    def __post_init__(self) -> None:
        if self.cli.method != self.method:  # the plug-in's config carries the run's method (adapters record it)
            self.cli = CLIConfig.from_dict({**self.cli.to_dict(), "method": self.method})
        if self.optim.warmup_steps > self.trainer.max_steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds trainer.max_steps "
                             f"({self.trainer.max_steps})")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["cli"]["method"]  # it is the top-level method
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cli = data.get("cli")
        if isinstance(cli, dict) and "method" in cli:
            raise ValueError(f"cli.method={cli['method']!r}: a recipe sets the method once, at the top level "
                             f"(method: {cli['method']}, or method={cli['method']} on the command line)")
        if isinstance(cli, dict):  # the plug-in's config is checked against the run's method (llm_lora's fields)
            data = {**data, "cli": {**cli, "method": data.get("method", "cli")}}
        return build(cls, data)


# --- loading: YAML + dotted overrides, every key checked ----------------------------------------------

def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or nothing) plus ``key=value`` overrides -> a validated TrainConfig."""
    data = read_yaml_mapping(path) if path is not None else {}
    for item in overrides:
        apply_override(TrainConfig, data, item)
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
