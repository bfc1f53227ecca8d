"""``crosslayer train --config FILE.yaml [key=value ...]``: train the CLI plug-in (or a baseline) on cached
features with Ray Train + DeepSpeed, as a thin entrypoint in three steps, like a torchtune recipe:

- ``setup``: typed config, the base loaded once to check the plug-in config, the feature cache's key and every
  data row (bad input fails here, before any worker starts), the tokenised examples written once for the
  workers (tokens and feature locations; the workers stream the features, ``jobs.train_stream``);
- ``train``: ``TorchTrainer(train_loop_per_worker)`` with checkpoints in ``trainer.storage_path`` under the run
  name (the same name and storage resume the run from its newest checkpoint; fresh runs get fresh names) and
  ``FailureConfig(max_failures)`` for dead workers;
- ``finish``: from the final checkpoint, ``output_dir/adapter/``, ``metrics.jsonl``, ``loss.png`` and
  ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pipelines import storage

from .faults import FaultPlan
from .train_config import TrainConfig, deepspeed_config, load_config
from .train_data import PreparedData, prepare_data, rank_sizes, write_examples
from .train_loop import STATE_FILE, WorkerPlan, build_model, param_groups, train_loop_per_worker

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's controller poll interval (Ray's default: 2 s)


@dataclass
class TrainSetup:
    cfg: TrainConfig
    data: PreparedData
    run_name: str  # Ray Train run name
    storage_path: str  # Ray Train storage (absolute folder or s3://)
    pad_id: int  # right-padding token
    params: dict[str, Any]  # FusedVLM.param_counts()
    started: float  # time.time() at setup


def fresh_run_name() -> str:
    return f"crosslayer-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def setup(cfg: TrainConfig) -> TrainSetup:
    """Check everything that can be checked without workers; raise ValueError/FileNotFoundError if wrong."""
    from cli_module.loading import load_base

    started = time.time()
    cfg = absolute_paths(cfg)  # workers may run in another folder
    base = load_base(cfg.base)
    model = build_model(base, cfg)  # checks the plug-in config against the base, loads init_projector
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method {cfg.method!r} has no trainable parameters: it is the frozen base as it is; "
                         f"evaluate it without training, or pick cli, projector_ft, deepstack, input_fusion or instruct")
    param_groups(model, cfg.optim)  # refuses a learning-rate scale for parameters this method does not train
    data = prepare_data(cfg, base, model.vision_layers)
    tok = base.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    run_name = cfg.trainer.run_name or fresh_run_name()
    storage_path = cfg.trainer.storage_path or storage.join(cfg.output_dir, "runs")
    if not storage_path.startswith("s3://"):
        storage_path = storage.resolve(storage_path)[1]
    return TrainSetup(cfg=cfg, data=data, run_name=run_name, storage_path=storage_path, pad_id=pad_id,
                      params=model.param_counts(), started=started)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its local paths made absolute (s3:// URIs and unset paths as they are)."""
    def fix(path: str | None) -> str | None:
        return path if not path or path.startswith("s3://") else os.path.abspath(path)

    base = os.path.abspath(cfg.base) if os.path.isdir(cfg.base) else cfg.base  # a local folder, as transformers
    return dataclasses.replace(                                                  # resolves a name (folder first)
        cfg, base=base, output_dir=fix(cfg.output_dir), init_projector=fix(cfg.init_projector),
        data=dataclasses.replace(cfg.data, train=fix(cfg.data.train), eval=fix(cfg.data.eval),
                                 features=fix(cfg.data.features), image_root=fix(cfg.data.image_root)),
        trainer=dataclasses.replace(cfg.trainer, storage_path=fix(cfg.trainer.storage_path)))


def train(s: TrainSetup) -> Any:
    """Run TorchTrainer.fit; returns its Result (raises ray.train.TrainingFailedError if the run failed)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, t = s.cfg, s.cfg.trainer
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    storage.write_json(storage.join(cfg.output_dir, "run.json"),
                       {"run_name": s.run_name, "storage_path": s.storage_path, "config": cfg.to_dict()})
    print(f"[train] run {s.run_name} in {s.storage_path} (rerun with trainer.run_name={s.run_name} to resume); "
          f"{len(s.data.train)} train / {len(s.data.eval)} eval examples ({s.data.text_only} text-only, "
          f"{s.data.truncated} truncated to {s.data.max_length} tokens), skipped {s.data.skipped or 0}; "
          f"{s.params['trainable_params']:,} trainable parameters ({s.params['trainable_percent']}%)", flush=True)
    sizes = rank_sizes(s.data, t.num_workers, t.seed)
    examples = write_examples(s.data, storage.join(cfg.output_dir, "token-cache", f"examples-{s.run_name}.parquet"))
    plan = WorkerPlan(config=cfg.to_dict(), cache=asdict(s.data.cache), examples=examples, pad_id=s.pad_id,
                      train_sizes=sizes["train"],
                      eval_sizes=sizes["eval"], ds_config=deepspeed_config(cfg, t.num_workers), run_name=s.run_name,
                      extra={"feature_cache": s.data.cache.uri or "none (encoded on the fly)"},
                      faults=FaultPlan.from_env().to_dict())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(plan),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=s.run_name, storage_path=s.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    with env_var(POLL_ENV, str(t.poll_interval_s)):  # read by the controller Ray Train starts in fit()
        return trainer.fit()


@contextlib.contextmanager
def env_var(key: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of the block (unless the user set it already)."""
    if key in os.environ:
        yield
        return
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None)


def finish(s: TrainSetup, result: Any) -> dict[str, Any]:
    """Copy the final checkpoint's adapter (method instruct: its derived base, ``model/``) and write metrics.jsonl,
    loss.png and summary.json."""
    out = s.cfg.output_dir
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"run {s.run_name} finished without a checkpoint")

    def read(rel: str) -> bytes:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{rel}") as f:
            return f.read()

    from cli_module.adapter import CONFIG, WEIGHTS
    from cli_module.derived import DERIVED_FILE, DERIVED_WEIGHTS

    instruct = s.cfg.method == "instruct"
    folder, files = ("model", (DERIVED_WEIGHTS, DERIVED_FILE)) if instruct else ("adapter", (WEIGHTS, CONFIG))
    for name in files:  # the json last: a folder holding it is complete
        storage.write_atomic(storage.join(out, folder, name), read(f"{folder}/{name}"))
    state = json.loads(read(STATE_FILE))
    history = state["history"]
    storage.write_atomic(storage.join(out, "metrics.jsonl"),
                         "".join(json.dumps(row) + "\n" for row in history).encode())
    storage.write_atomic(storage.join(out, "loss.png"), loss_png(history, s.run_name))
    last_eval = next((r for r in reversed(history) if "eval_loss" in r), {})
    last_train = next((r for r in reversed(history) if "loss" in r), {})
    summary = {"run_name": s.run_name, "storage_path": s.storage_path, "checkpoint": ckpt.path,
               "steps": state["step"], "loss": last_train.get("loss"), "eval_loss": last_eval.get("eval_loss"),
               "eval_token_acc": last_eval.get("eval_token_acc"), "tokens_per_s": last_train.get("tokens_per_s"),
               "examples": {"train": len(s.data.train), "eval": len(s.data.eval)}, "rows_read": s.data.rows_read,
               "skipped": s.data.skipped, "truncated": s.data.truncated, "text_only": s.data.text_only,
               "params": s.params, "adapter": None if instruct else storage.join(out, "adapter"),
               "base": storage.join(out, "model") if instruct else s.cfg.base,
               "seconds": round(time.time() - s.started, 1)}
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


def loss_png(history: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """setup -> train -> finish; returns the summary."""
    s = setup(cfg)
    result = train(s)
    return finish(s, result)


# --- command line ------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the plug-in (or a baseline) on cached features: Ray Train + DeepSpeed",
                       description="Dotted overrides follow the YAML, e.g. trainer.max_steps=10 cli.lora_rank=8 "
                                   "deepspeed.zero_stage=3; reuse trainer.run_name to resume a run.")
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the YAML")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    cfg = load_config(args.config, args.overrides)
    s = setup(cfg)
    try:
        result = train(s)
    except TrainingFailedError as err:
        print(f"crosslayer train: run {s.run_name} failed: {err}\nresume it from its newest checkpoint with "
              f"trainer.run_name={s.run_name}", file=sys.stderr)
        return 1
    summary = finish(s, result)
    print(f"[train] done in {summary['seconds']} s: step {summary['steps']}, loss {summary['loss']}, "
          f"eval loss {summary['eval_loss']}, adapter in {summary['adapter']}")
    print(json.dumps(summary))
    return 0
