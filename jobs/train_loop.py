"""The per-worker training loop of ``crosslayer train``: Ray Train calls ``train_loop_per_worker`` on each rank.

Per rank: take its shard of cached features (``ray.train.get_dataset_shard``), load the base without its vision
encoder (features come from the cache; the tower is replaced by a weightless stand-in), wrap it in ``FusedVLM``,
hand AdamW over the trainable parameters and a warmup + decay schedule to ``deepspeed.initialize``, resume from
``ray.train.get_checkpoint()`` if there is one, then loop: micro-batches (a pure function of seed, epoch, step
and rank), ``engine.backward``/``engine.step``, a metric row every ``log_every`` steps, the held-out loss and
answer-token accuracy every ``eval_every`` steps, and every ``checkpoint_every`` steps a collective
``engine.save_checkpoint`` plus the adapter and the metric history, reported with ``ray.train.report``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .faults import FaultPlan
from .train_config import TrainConfig, lr_factor
from .train_data import CacheView
from .train_stream import (
    FeatureReader,
    ImageFeatures,
    Loader,
    MicroBatches,
    PixelStream,
    RankExamples,
    order_seed,
)

STATE_FILE = "trainer_state.json"  # step, DeepSpeed tag, world size, metric history: beside DeepSpeed's files


@dataclass
class WorkerPlan:
    """What the driver settled for the workers; plain values, sent as ``train_loop_config``."""

    config: dict[str, Any]  # TrainConfig.to_dict()
    cache: dict[str, Any]  # CacheView fields
    examples: str  # the run's examples file (tokens and feature locations; each rank reads its own rows)
    pad_id: int  # token id used to right-pad sequences
    train_sizes: list[int]  # training examples per rank
    eval_sizes: list[int]  # eval examples per rank (all zero: no eval)
    ds_config: dict[str, Any]  # the DeepSpeed config
    run_name: str  # Ray Train run name (recorded in the adapter)
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in adapter_config.json
    faults: dict[str, Any] = field(default_factory=dict)  # FaultPlan fields (tests only; see jobs.faults)


# --- model -------------------------------------------------------------------------------------------

def build_model(base: Any, cfg: TrainConfig) -> Any:
    """FusedVLM with the plug-in initialised from trainer.seed (the same on every rank and every attempt)."""
    from cli_module.adapter import load_projector
    from cli_module.model import FusedVLM

    if cfg.init_projector:
        load_projector(base, cfg.init_projector)  # first: input_fusion widens the trained P
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed)
        model = FusedVLM(base, cfg.cli)
    model.projector_modified = model.projector_modified or bool(cfg.init_projector)
    return model


def adapter_params(model: Any) -> list[nn.Parameter]:
    """The parameters an adapter file holds (gathered first under ZeRO-3)."""
    params = [p for n, p in model.named_parameters() if not n.startswith("base_model.")]
    params += list(model.method.base_parameters(model).values())  # llm_lora's, inside the LLM
    if model.trains_base:  # instruct: what a derived base holds
        from cli_module.derived import trained_modules

        return params + [p for m in trained_modules(model.base).values() for p in m.parameters()]
    if model.projector_modified:
        params += list(model.base.projector.parameters())
    return params


# --- DeepSpeed -----------------------------------------------------------------------------------------

def skip_shm_comm_op() -> None:
    """On CPU, DeepSpeed builds its shared-memory all-reduce op (~50 s of C++ compilation per fresh machine)
    when its comm backend starts, though only inference_all_reduce uses it; training collectives go through the
    process group Ray Train created (gloo). deepspeed.ops keeps its op probe results in a module dict that
    persists edits, so marking the op incompatible there skips the build."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def param_groups(model: nn.Module, o: Any) -> list[dict[str, Any]]:
    """The trainable parameters in AdamW groups: AGF's gate controller at lr * gate_lr_scale, its output map W_o at
    lr * out_lr_scale, the LLM (method instruct) at lr * lm_lr_scale, the rest at lr (the schedule scales every
    group alike). A scale other than 1 for parameters this method does not have is refused, not ignored."""
    groups: dict[str, list[nn.Parameter]] = {"rest": [], "gate": [], "out": [], "lm": []}  # rest first: logged lr
    lm = {id(p) for p in model.base.language_model.parameters()} | {id(p) for p in model.base.lm_head.parameters()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            agf_gate = name.startswith("agf.") and (".gate_proj." in name or name.endswith(".gate_bias"))
            kind = "gate" if agf_gate else \
                "out" if name.startswith("agf.") and ".out_proj." in name else "lm" if id(p) in lm else "rest"
            groups[kind].append(p)
    scale = {"gate": o.gate_lr_scale, "out": o.out_lr_scale, "lm": o.lm_lr_scale, "rest": 1.0}
    owner = {"gate": "AGF gate", "out": "AGF output", "lm": "LLM"}
    for kind, option in (("gate", "optim.gate_lr_scale"), ("out", "optim.out_lr_scale"), ("lm", "optim.lm_lr_scale")):
        if scale[kind] != 1.0 and not groups[kind]:
            raise ValueError(f"{option}={scale[kind]} but this model trains no {owner[kind]} parameters (method "
                             f"{'instruct or llm_lora' if kind == 'lm' else 'cli with a gate'} has them); leave {option} at 1")
    return [{"params": ps, "lr": o.lr * scale[kind], "name": kind} for kind, ps in groups.items() if ps]


def make_engine(model: nn.Module, cfg: TrainConfig, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """-> (engine, lr scheduler): AdamW over the trainable parameters only, LambdaLR warmup + decay."""
    import deepspeed

    skip_shm_comm_op()
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, optim=o, max_steps=cfg.trainer.max_steps))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, scheduler


# --- evaluation ----------------------------------------------------------------------------------------

def answer_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, S, V), labels (B, S) -> [cross-entropy sum, answer tokens, correct argmax] (float64)."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]  # (B, S-1, V), (B, S-1): next-token targets
    mask = target != -100
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
    correct = ((logits.argmax(-1) == target) & mask).sum()
    return torch.stack([ce.double(), mask.sum().double(), correct.double()])


@torch.no_grad()
def eval_sums(forward: Any, data: Loader, batch_size: int, num_batches: int,
              device: Any = "cpu", gate_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Sums over ``num_batches`` batches (the same count on every rank: ZeRO-3 forwards are collective); a rank
    out of rows repeats its first batch with weight 0. With ``gate_shape`` (|T|, K): then the answer tokens of the
    rows that have an image, and the AGF gates summed over those positions, flattened, for ``eval_metrics`` to
    average. A batch of text-only rows (LLaVA's ShareGPT conversations) has no gates and adds only its loss."""
    sums = torch.zeros(3 + (1 + gate_shape[0] * gate_shape[1] if gate_shape else 0), dtype=torch.float64)
    for b in range(num_batches):
        rows, weight = np.arange(b * batch_size, min((b + 1) * batch_size, len(data))), 1.0
        if len(rows) == 0:
            rows, weight = np.arange(min(batch_size, len(data))), 0.0
        batch = data.batch(rows).to(device)
        out = forward(batch.input_ids, batch.attention_mask, features=batch.features,
                      **({"return_gates": True} if gate_shape else {}))
        sums[:3] += weight * answer_sums(out.logits, batch.labels).cpu()
        if gate_shape and out.gates is not None:
            answer = batch.labels[:, 1:] != -100  # (B, S-1): positions predicting an answer token
            rows_with_image = batch.features.rows if batch.features.rows is not None else None
            if rows_with_image is not None:
                answer = answer & rows_with_image.unsqueeze(1)  # text-only rows of a mixed batch carry no gates
            g = (out.gates[:, :-1].double() * answer[..., None, None]).sum(dim=(0, 1))  # (|T|, K)
            sums[3] += weight * float(answer.sum())
            sums[4:] += weight * g.flatten().cpu()
    return sums


def eval_metrics(sums: torch.Tensor, gate_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """-> eval_loss and eval_token_acc (per answer token); with ``gate_shape`` (|T|, K), eval_gates: the mean gate
    of each injection layer (rows) and vision layer (columns) at the positions that predict an answer token in
    rows with an image (absent when no evaluated row had one)."""
    tokens = max(float(sums[1]), 1.0)
    out: dict[str, Any] = {"eval_loss": float(sums[0]) / tokens, "eval_token_acc": float(sums[2]) / tokens}
    if gate_shape is not None and float(sums[3]) > 0:
        gates = (sums[4:] / float(sums[3])).view(gate_shape)
        out["eval_gates"] = [[round(float(v), 4) for v in row] for row in gates]
    return out


# --- checkpoints ---------------------------------------------------------------------------------------

def save_checkpoint(engine: Any, model: Any, plan: WorkerPlan, cfg: TrainConfig, step: int,
                    history: list[dict], rank: int, metrics: dict[str, Any]) -> None:
    """Collective: DeepSpeed's files (frozen base excluded), the adapter and the state, reported to Ray Train."""
    import deepspeed
    import ray.train

    tmp = tempfile.mkdtemp(prefix=f"crosslayer-ckpt-r{rank}-")
    try:
        tag = f"global_step{step}"
        engine.save_checkpoint(tmp, tag=tag, exclude_frozen_parameters=True)
        extra = {"train_step": step, "run_name": plan.run_name, **plan.extra}
        with deepspeed.zero.GatheredParameters(adapter_params(model), modifier_rank=None):
            if not model.trains_base:
                from cli_module.adapter import save_adapter

                save_adapter(model, Path(tmp) / "adapter", is_main_process=rank == 0, extra=extra)
            elif rank == 0:  # instruct: the trained P and LLM, as a base over cfg.base
                from cli_module.derived import save_derived

                save_derived(model.base, Path(tmp) / "model", cfg.base, model.base.revision, extra)
        if rank == 0:
            state = {"step": step, "tag": tag, "world_size": len(plan.train_sizes), "history": history,
                     "base": cfg.base, "cli_config": cfg.cli.to_dict(), "seed": cfg.trainer.seed}
            Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine: Any, cfg: TrainConfig, world: int) -> tuple[int, list[dict]]:
    """-> (completed steps, metric history) from the newest reported checkpoint, or (0, []) on a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        if state["world_size"] != world:
            raise ValueError(f"checkpoint was written by {state['world_size']} workers, this run has {world}; "
                             f"resume with trainer.num_workers={state['world_size']}")
        if state["base"] != cfg.base or state["cli_config"] != cfg.cli.to_dict() or state["seed"] != cfg.trainer.seed:
            raise ValueError("the checkpoint was written with another base, cli config or seed; resume a run "
                             "with its own config, or start a fresh run (a new trainer.run_name)")
        path, _ = engine.load_checkpoint(d, tag=state["tag"], load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {state['tag']} in {d}")
    return state["step"], [h for h in state["history"] if h["step"] <= state["step"]]


# --- the loop ------------------------------------------------------------------------------------------

class WorkerTrainer:
    """One rank's run: ``setup`` (shard, model, engine, resume), ``train`` (the loop), like a torchtune recipe."""

    def __init__(self, plan: WorkerPlan):
        import ray.train

        self.plan, self.cfg = plan, TrainConfig.from_dict(plan.config)
        self.faults = FaultPlan(**plan.faults)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def setup(self) -> None:
        from cli_module.loading import load_base

        t0, t, plan = time.perf_counter(), self.cfg.trainer, self.plan
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
        if self.faults.pid_dir:
            Path(self.faults.pid_dir).mkdir(parents=True, exist_ok=True)
            Path(self.faults.pid_dir, f"rank{self.rank}.pid").write_text(str(os.getpid()))
        view = CacheView(**plan.cache)
        shard = RankExamples.read(plan.examples, self.rank, self.world, t.seed,
                                  {"train": sum(plan.train_sizes), "eval": sum(plan.eval_sizes)})
        t1 = time.perf_counter()
        base = load_base(self.cfg.base, vision=view.uri is None)  # with a cache: no encoder weights
        self.model = build_model(base, self.cfg)
        reader = FeatureReader(view) if view.uri else None
        images = None if view.uri else ImageFeatures(self.model)
        self.train_data = Loader(shard["train"], plan.pad_id, reader, images)
        self.eval_data = Loader(shard["eval"], plan.pad_id, reader, images) if sum(plan.eval_sizes) else None
        self.eval_batches = -(-max(plan.eval_sizes) // t.eval_batch_size)  # the same count on every rank
        self.micro = MicroBatches(len(self.train_data), t.micro_batch_size,
                                  min(plan.train_sizes) // t.micro_batch_size, t.seed, self.rank)
        t2 = time.perf_counter()
        self.engine, self.scheduler = make_engine(self.model, self.cfg, plan.ds_config)
        t3 = time.perf_counter()
        self.step, self.history = restore(self.engine, self.cfg, self.world)
        self.start = self.step
        if view.uri is None:  # on the fly: Ray Data decodes this rank's images from here on, in the run's order
            self.train_data.stream = PixelStream(shard["train"], self.micro, self.step * t.grad_accum,
                                                 t.max_steps * t.grad_accum + 1, base.image_processor)
        if self.rank == 0:
            say(f"[train] rank 0 ready in {time.perf_counter() - t0:.1f} s: {len(self.train_data)} train examples "
                f"{t1 - t0:.1f} s, model {t2 - t1:.1f} s, deepspeed.initialize {t3 - t2:.1f} s, features "
                f"{'streamed from the cache' if view.uri else 'encoded on the fly'}"
                + (f", resumed at step {self.step}" if self.step else ""))

    def evaluate(self) -> dict[str, float]:
        import torch.distributed as dist

        cli = self.cfg.cli
        gate_shape = (len(cli.inject_layers), len(cli.vision_layers)) \
            if self.cfg.method == "cli" and cli.gate != "none" else None
        self.engine.eval()
        sums = eval_sums(self.engine, self.eval_data, self.cfg.trainer.eval_batch_size, self.eval_batches,
                         self.engine.device, gate_shape)
        sums = sums.to(self.engine.device)
        dist.all_reduce(sums)
        self.engine.train()
        return eval_metrics(sums.cpu(), gate_shape)

    def train_step(self) -> tuple[torch.Tensor, int]:
        """One optimizer step -> ([loss sum, micro-batches, real tokens] summed over ranks, epoch)."""
        import torch.distributed as dist

        t = self.cfg.trainer
        sums = torch.zeros(3, dtype=torch.float64)
        for a in range(t.grad_accum):
            m = self.step * t.grad_accum + a  # the run's micro-batch index: resumable
            epoch, rows = self.micro.rows(m)
            batch = self.train_data.batch(rows)
            self.train_data.prefetch(self.micro.rows(m + 1)[1])  # read while this micro-batch computes
            batch = batch.to(self.engine.device)
            torch.manual_seed(order_seed(t.seed, m, self.rank))  # dropout masks
            out = self.engine(batch.input_ids, batch.attention_mask, features=batch.features, labels=batch.labels)
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed steps the optimizer and the schedule at the accumulation boundary
            sums += torch.tensor([out.loss.detach().item(), 1.0, batch.tokens], dtype=torch.float64)
        sums = sums.to(self.engine.device)  # NCCL reduces GPU tensors only; gloo takes CPU ones
        dist.all_reduce(sums)
        return sums.cpu(), epoch

    def train(self) -> dict[str, Any]:
        import ray.train

        t = self.cfg.trainer
        if self.step == 0 and self.eval_data is not None:  # the untrained model's held-out loss: the first point
            self.history.append({"step": 0, **self.evaluate()})
        self.engine.train()
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            sums, epoch = self.train_step()
            self.step += 1
            elapsed, step = time.perf_counter() - t0, self.step
            do_eval = self.eval_data is not None and (step == t.max_steps or (t.eval_every and step % t.eval_every == 0))
            if do_eval or step % t.log_every == 0 or step == t.max_steps:
                row = {"step": step, "epoch": epoch, "loss": float(sums[0] / sums[1]), "lr": lr,
                       "tokens_per_s": float(sums[2]) / elapsed, "step_time_s": elapsed,
                       "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
                if do_eval:
                    row.update(self.evaluate())
                self.history.append(row)
                if self.rank == 0:
                    say(progress_line(row, t.max_steps))
            if step == t.max_steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                # metrics reach Ray Train with checkpoints only: each report is a barrier that waits for a poll
                latest = self.history[-1] if self.history[-1:] and self.history[-1]["step"] == step else {"step": step}
                save_checkpoint(self.engine, self.model, self.plan, self.cfg, step, self.history, self.rank, latest)
            if self.faults.crash_at_step == step and self.start == 0 and self.rank == 0:
                raise RuntimeError(f"fault injection crash_at_step={step}: injected failure after step {step}")
            if self.faults.step_sleep_s:
                time.sleep(self.faults.step_sleep_s)
        if self.start >= t.max_steps:  # a finished run restarted: nothing to train, its newest checkpoint stands
            ray.train.report({"step": self.step})
        return {"step": self.step, "resumed_from": self.start}


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry on each rank: the plan in, the rank's run out."""
    trainer = WorkerTrainer(WorkerPlan(**loop_config))
    trainer.setup()
    return trainer.train()


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver. Not ``print``: Ray Train patches it in
    workers to both print and log, so every line would reach the driver twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def progress_line(row: dict[str, Any], max_steps: int) -> str:
    line = (f"[train] step {row['step']}/{max_steps} epoch {row['epoch']} loss {row['loss']:.4f} "
            f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s {row['step_time_s'] * 1000:.0f} ms/step")
    if "eval_loss" in row:
        line += f" | eval loss {row['eval_loss']:.4f} answer-token acc {row['eval_token_acc']:.3f}"
    if "eval_gates" in row:  # the mean over injection layers of each vision layer's gate
        line += " gates " + " ".join(f"{float(np.mean(col)):.2f}" for col in zip(*row["eval_gates"]))
    return line
