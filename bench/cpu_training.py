"""Benchmark: bf16 against fp32 training on this CPU, and 1 worker x 2 threads against 2 workers x 1 thread
(run by hand; one JSON line per run, then the comparison). All runs are ``crosslayer train`` itself on the `small`
base (CLI over a fresh projector, configs/small-stage2.yaml without init_projector), the same data, seed and steps.

    python bench/cpu_training.py                      # 100 steps: fp32 and bf16 (1x2), then bf16 2x1
    python bench/cpu_training.py --steps 10 --n 64    # a quick smoke run

Parity: the per-step training loss of both precisions side by side (``--curves FILE`` writes them as JSON) and
the final validation loss. Speed: the median step time of steps past the warmup (``step_time_s`` in
metrics.jsonl, so start-up is not counted). bf16 means DeepSpeed's bf16 mode: the frozen base in bf16, the
trained parameters with fp32 master weights in the optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n", type=int, default=400, help="synthetic images (train/val/test split by synth)")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the workers)")
    p.add_argument("--work", default=str(ROOT / "out" / "bench-cpu-training"))
    p.add_argument("--curves", help="write the loss curves (JSON) here")
    p.add_argument("--runs", nargs="+", default=["fp32:1x2", "bf16:1x2", "bf16:2x1"],
                   help="PRECISION:WORKERSxTHREADS")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from jobs.train import run_train
    from jobs.train_config import load_config
    from pipelines.features import FeatureJob, run_features
    from pipelines.synth import SynthConfig, synthesize

    ray.init(configure_logging=False, num_cpus=os.cpu_count())
    work = Path(args.work)
    data = work / f"synth-{args.n}"
    if not (data / "train.jsonl").exists():
        synthesize(SynthConfig(out=str(data), n=args.n, image_size=112, seed=0))
    cache = work / f"cache-{args.n}"
    if not (cache / "cache.json").exists():
        run_features(FeatureJob(src=str(data / "images"), out=str(cache), base="small", vision_layers=[3, 6, 9, 12],
                                pool=1, dtype="float16", batch_size=16, threads=2))
    results, curves = {}, {}
    for run in args.runs:
        precision, shape = run.split(":")
        workers, threads = (int(x) for x in shape.split("x"))
        out = work / f"run-{precision}-{shape}-{int(time.time())}"
        cfg = load_config(ROOT / "configs" / "small-stage2.yaml", [
            "init_projector=null", f"data.train={data}/train.jsonl", f"data.eval={data}/val.jsonl",
            f"data.features={cache}", f"output_dir={out}", f"trainer.num_workers={workers}",
            f"trainer.cpus_per_worker={threads}", f"trainer.micro_batch_size={args.batch // workers}",
            "trainer.grad_accum=1", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
            f"trainer.eval_every={args.steps}", f"trainer.checkpoint_every={args.steps}", "trainer.seed=0",
            f"deepspeed.precision={precision}", "optim.lr=1e-3", f"optim.warmup_steps={max(1, args.steps // 10)}"])
        summary = run_train(cfg)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "step_time_s" in r]
        warm = [r["step_time_s"] for r in steps if r["step"] > max(2, args.steps // 10)]
        results[run] = {"measure": "cpu_training", "run": run, "precision": precision, "workers": workers,
                        "threads": threads, "steps": args.steps, "median_step_s": round(statistics.median(warm), 4),
                        "final_train_loss": round(steps[-1]["loss"], 4),
                        "final_eval_loss": round(summary["eval_loss"], 4),
                        "eval_token_acc": round(summary["eval_token_acc"], 4), "run_seconds": summary["seconds"]}
        curves[run] = [round(r["loss"], 4) for r in steps]
        print(json.dumps(results[run]), flush=True)
    if args.curves:
        Path(args.curves).write_text(json.dumps(curves) + "\n")
    comparison = {"measure": "comparison"}
    if "fp32:1x2" in results and "bf16:1x2" in results:
        a, b = results["fp32:1x2"], results["bf16:1x2"]
        comparison["bf16_speedup_1x2"] = round(a["median_step_s"] / b["median_step_s"], 3)
        comparison["eval_loss_fp32_bf16"] = [a["final_eval_loss"], b["final_eval_loss"]]
        diffs = [abs(x - y) for x, y in zip(curves["fp32:1x2"], curves["bf16:1x2"])]
        comparison["train_loss_max_abs_diff"] = round(max(diffs), 4)
    if "bf16:1x2" in results and "bf16:2x1" in results:
        comparison["bf16_1x2_over_2x1_step_time"] = round(
            results["bf16:1x2"]["median_step_s"] / results["bf16:2x1"]["median_step_s"], 3)
    print(json.dumps(comparison), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
