"""Benchmark: does a training worker's memory grow with the dataset? (run by hand; one JSON line per size, then
the ratios). Goal (issue "Training at the scale of LLaVA's data"): peak worker RSS at the largest size <= 1.2x the
smallest, over the same number of steps; the object store's peak use is reported.

    python bench/train_memory.py                       # tiny base, 2,000 and 50,000 examples, 30 steps
    python bench/train_memory.py --sizes 200 2000 --steps 5          # a quick smoke run

Each size gets its own synthetic data (16x16 colour images, two questions per image, so images = examples / 2)
and feature cache in ``--work`` (built once, reused), then ``crosslayer train`` itself: one worker, the same
micro-batch and steps. Worker RSS is the worker's ``ru_maxrss`` (``max_rss_mb`` in metrics.jsonl); the object
store is polled (cluster total - available) every 0.2 s during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220), "yellow": (225, 210, 30)}


def build(work: Path, examples: int) -> Path:
    import numpy as np
    from PIL import Image

    from pipelines.features import FeatureJob, run_features

    root = work / f"data-{examples}"
    if (root / "cache" / "cache.json").exists():
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for i in range(examples // 2):
            name = list(COLOURS)[i % 4]
            pixels = np.array(COLOURS[name])[None, None] + rng.integers(-40, 40, (16, 16, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:06d}.png")
            for q in ("What colour is this image?", "Name the colour."):
                f.write(json.dumps({"image": f"images/{i:06d}.png", "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": name}]}) + "\n")
    run_features(FeatureJob(src=str(root / "images"), out=str(root / "cache"), base="tiny", vision_layers=[1, 2],
                            pool=1, dtype="float16", batch_size=256, concurrency=1))
    return root


def object_store_peak(stop: threading.Event, out: dict) -> None:
    import ray

    peak = 0.0
    while not stop.is_set():
        total = ray.cluster_resources().get("object_store_memory", 0.0)
        free = ray.available_resources().get("object_store_memory", total)
        peak = max(peak, total - free)
        time.sleep(0.2)
    out["peak_mb"] = round(peak / 2**20, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000], help="training examples")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", default=str(ROOT / "out" / "bench-train-memory"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from jobs.train import run_train
    from jobs.train_config import load_config

    ray.init(configure_logging=False, num_cpus=os.cpu_count())
    work, results = Path(args.work), {}
    for n in args.sizes:
        t0 = time.time()
        root = build(work, n)
        built = time.time() - t0
        out = work / f"run-{n}-{int(time.time())}"
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            f"data.train={root}/train.jsonl", "data.eval=null", "data.eval_fraction=0", f"data.features={root}/cache",
            f"output_dir={out}", "trainer.num_workers=1", f"trainer.micro_batch_size={args.batch}",
            f"trainer.max_steps={args.steps}", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "data.tokenize_chunk=5000", "optim.warmup_steps=1"])
        stop, store = threading.Event(), {}
        poller = threading.Thread(target=object_store_peak, args=(stop, store), daemon=True)
        poller.start()
        summary = run_train(cfg)
        stop.set()
        poller.join()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "max_rss_mb" in r]
        results[n] = {"measure": "train_memory", "examples": n, "images": n // 2, "steps": args.steps,
                      "worker_peak_rss_mb": max(r["max_rss_mb"] for r in steps),
                      "object_store_peak_mb": store["peak_mb"],
                      "median_step_s": sorted(r["step_time_s"] for r in steps)[len(steps) // 2],
                      "run_seconds": summary["seconds"], "data_build_seconds": round(built, 1)}
        print(json.dumps(results[n]), flush=True)
    small, large = results[min(args.sizes)], results[max(args.sizes)]
    print(json.dumps({"measure": "ratios", "examples": [min(args.sizes), max(args.sizes)],
                      "worker_peak_rss": round(large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"], 3),
                      "object_store_peak": [small["object_store_peak_mb"], large["object_store_peak_mb"]]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
