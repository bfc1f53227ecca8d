"""Benchmark of the training step (run by hand; prints one JSON line per measurement, then the ratios):

1. cached features vs the encoder on the fly: one process, the same batch, the same FusedVLM step
   (forward + backward + AdamW), fed from the feature cache or from pixels through the frozen encoder; and the
   training order's micro-batches with features streamed from the cache (prefetched, as workers read them) vs
   held in memory (the pre-streaming design);
2. Ray Train + DeepSpeed (1 worker) vs a plain single-process PyTorch loop over the same cached data, the same
   micro-batches and optimizer (the Ray run is ``crosslayer train`` itself; its step time is the median of
   ``step_time_s`` in its metrics.jsonl, so startup is not counted; the plain loop is timed before and after it).
Single-process steps are timed in turns (cache, encoder, plain, cache, ...) so other load on the machine falls
on all of them alike; medians throughout.

    python bench/train_step.py                          # small base, configs/small-stage2.yaml (no stage-1 P)
    python bench/train_step.py --config configs/tiny.yaml --steps 20   # a quick smoke run

Data: ``--n`` synthetic images (``crosslayer data synth``) and their feature cache are built once in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def interleaved(steps: dict[str, object], n: int, warmup: int) -> dict[str, float]:
    """Median seconds of each step function, timed in turns (A B A B ...) so that load from other processes on
    the machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_data(work: Path, cfg_path: str, n: int, image_size: int) -> tuple[Path, Path, list[int]]:
    """Synthetic data + a feature cache holding the layers the config's method reads (once per --work)."""
    import ray

    from cli_module.config import resolve_vision_layers
    from cli_module.loading import load_base
    from jobs.train_config import load_config
    from jobs.train_loop import build_model
    from pipelines.features import FeatureJob, run_features
    from pipelines.synth import SynthConfig, synthesize

    cfg = load_config(cfg_path, ["init_projector=null"])
    base = load_base(cfg.base)
    layers = build_model(base, cfg).vision_layers or resolve_vision_layers([base.select_layer], base.num_vision_layers)
    data = work / f"synth-{n}-{image_size}"
    if not (data / "meta.json").exists():
        synthesize(SynthConfig(out=data, n=n, image_size=image_size, val_frac=0.0, test_frac=0.0))
    cache = work / f"cache-{cfg.base}-{'-'.join(map(str, layers))}-p{cfg.cli.pool}"
    if not (cache / "cache.json").exists():
        if not ray.is_initialized():
            ray.init(configure_logging=False)
        run_features(FeatureJob(src=str(data / "images"), out=str(cache), base=cfg.base, vision_layers=layers,
                                pool=cfg.cli.pool, batch_size=16))
    return data, cache, layers


class Preloaded:
    """A FeatureReader stand-in holding every image of a split in memory, read once up front."""

    def __init__(self, reader, examples):
        import numpy as np

        unique = sorted({tuple(int(x) for x in loc) for loc in examples.location if loc[0] >= 0})
        self.row = {loc: i for i, loc in enumerate(unique)}
        self.columns = reader.read(np.array(unique, dtype=np.int32))
        self.view = reader.view

    def features(self, locations):
        from cli_module.model import VisionFeatures
        from pipelines.feature_cache import decode_column

        picked = {k: v[[self.row[tuple(int(x) for x in loc)] for loc in locations]] for k, v in self.columns.items()}
        layers = None
        if self.view.layer_index is not None:
            layers = decode_column(picked, "layers", self.view.dtype)[:, self.view.layer_index]
        return VisionFeatures(select_features=decode_column(picked, "select", self.view.dtype), layers=layers)


class LocalSteps:
    """The training step in this process (no Ray, no DeepSpeed): FusedVLM + AdamW over the trainable parameters."""

    def __init__(self, cfg, s, batch_size: int):
        from PIL import Image

        from cli_module.loading import load_base
        from jobs.train_data import cache_index
        from jobs.train_loop import build_model
        from jobs.train_stream import Loader, MicroBatches, local_loader

        self.shard = local_loader(s.data, "train", s.pad_id)
        base = load_base(cfg.base)  # whole: the on-the-fly path runs its encoder
        self.model = build_model(base, cfg).train()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.clip = o.grad_clip
        rows = list(range(batch_size))  # one fixed batch for the cache / encoder comparison
        self.batch = self.shard.batch(rows)
        source_of = {image_id: src for src, image_id in cache_index(s.data.cache).by_source.items()}
        images = [Image.open(source_of[s.data.train[int(self.shard.examples.idx[i])].image_id]).convert("RGB")
                  for i in rows]
        self.pixels = base.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        self.micro = MicroBatches(len(self.shard), batch_size, len(self.shard) // batch_size, cfg.trainer.seed, 0)
        self.position = self.position_pre = 0
        self.preloaded = Loader(self.shard.examples, s.pad_id, Preloaded(self.shard.reader, self.shard.examples))

    def _step(self, batch, **visual) -> None:
        out = self.model(batch.input_ids, batch.attention_mask, labels=batch.labels, **visual)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def from_cache(self) -> None:
        self._step(self.batch, features=self.batch.features)

    def encoder_on_the_fly(self) -> None:
        self._step(self.batch, pixel_values=self.pixels)

    def plain_loop(self) -> None:
        """The next micro-batch of rank 0's training order, as the Ray Train loop takes it: features streamed from
        the cache, the next micro-batch's read while this one computes."""
        batch = self.shard.batch(self.micro.rows(self.position)[1])
        self.shard.prefetch(self.micro.rows(self.position + 1)[1])
        self.position += 1
        self._step(batch, features=batch.features)

    def preloaded_loop(self) -> None:
        """The same micro-batches with every feature of the shard held in memory (the pre-streaming design)."""
        batch = self.preloaded.batch(self.micro.rows(self.position_pre)[1])
        self.position_pre += 1
        self._step(batch, features=batch.features)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "small-stage2.yaml"))
    p.add_argument("--work", default=str(ROOT / "out" / "bench-train-step"))
    p.add_argument("--n", type=int, default=32, help="synthetic images")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4, help="micro-batch (sequences per step)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-ray", action="store_true", help="only the single-process measurements")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)

    from jobs.train import run_train, setup
    from jobs.train_config import load_config

    work = Path(args.work)
    data, cache, layers = build_data(work, args.config, args.n, args.image_size)
    out = work / f"run-{int(time.time())}"
    overrides = ["init_projector=null", f"data.train={data}/train.jsonl", "data.eval=null", "data.eval_fraction=0",
                 f"data.features={cache}", f"output_dir={out}", "trainer.num_workers=1",
                 f"trainer.cpus_per_worker={args.threads}", f"trainer.micro_batch_size={args.batch}",
                 "trainer.grad_accum=1", f"trainer.max_steps={args.steps + args.warmup}", "trainer.log_every=1",
                 "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.poll_interval_s=0.25",
                 "optim.warmup_steps=0", "deepspeed.zero_stage=2", "deepspeed.precision=fp32"]
    cfg = load_config(args.config, overrides)
    s = setup(cfg)
    common = {"base": cfg.base, "method": cfg.method, "batch": args.batch, "threads": args.threads,
              "trainable_params": s.params["trainable_params"], "image_tokens": s.data.cache.image_tokens,
              "feature_layers": layers}
    local = LocalSteps(cfg, s, args.batch)
    # 1. cache vs encoder on the same batch; 2a. the plain loop, all in turns
    t = interleaved({"cache": local.from_cache, "encoder": local.encoder_on_the_fly, "plain": local.plain_loop,
                     "preloaded": local.preloaded_loop}, args.steps, args.warmup)
    print(json.dumps({"measure": "step_from_cache_s", "value": round(t["cache"], 4), **common}), flush=True)
    print(json.dumps({"measure": "step_encoder_on_the_fly_s", "value": round(t["encoder"], 4), **common}), flush=True)
    print(json.dumps({"measure": "plain_pytorch_step_s", "value": round(t["plain"], 4), **common}), flush=True)
    print(json.dumps({"measure": "plain_step_preloaded_features_s", "value": round(t["preloaded"], 4), **common}),
          flush=True)
    result = {"cache_over_encoder": round(t["cache"] / t["encoder"], 3),
              "streamed_over_preloaded": round(t["plain"] / t["preloaded"], 3)}

    # 3. Ray Train + DeepSpeed, one worker, the same config
    if not args.skip_ray:
        summary = run_train(cfg)
        rows_out = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in rows_out if r.get("step", 0) > args.warmup and "step_time_s" in r]
        t_ray = statistics.median(times)
        print(json.dumps({"measure": "ray_train_deepspeed_step_s", "value": round(t_ray, 4),
                          "zero_stage": 2, "run_seconds": summary["seconds"], **common}), flush=True)
        # 2b. the plain loop again right after (the machine's load may have changed during the Ray run)
        t_after = interleaved({"plain": local.plain_loop}, args.steps, 0)["plain"]
        print(json.dumps({"measure": "plain_pytorch_step_after_s", "value": round(t_after, 4), **common}), flush=True)
        result["raytrain_deepspeed_over_plain"] = round(t_ray / statistics.mean([t["plain"], t_after]), 3)
    print(json.dumps({"measure": "ratios", **result, **common}), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
