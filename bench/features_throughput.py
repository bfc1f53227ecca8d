"""Feature-cache throughput: the Ray Data pipeline's images/s divided by a bare PyTorch loop running the same
encoder on the same decoded, preprocessed images with the same number of threads, in one run; plus cache bytes
per image for each storage dtype against float32.

Run by hand (results go to bench/RESULTS.md with this command):
    .venv/bin/python bench/features_throughput.py --base small --n 256 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def bare_loop(base_name: str, folder: Path, vision_layers: list[int], pool: int, batch_size: int, threads: int) -> float:
    """Encoder only, on images decoded and preprocessed beforehand (not timed): images/s."""
    from PIL import Image

    from cli_module.config import resolve_vision_layers
    from cli_module.loading import load_base
    from cli_module.model import encode_images

    torch.set_num_threads(threads)
    base = load_base(base_name)
    files = sorted(folder.iterdir())
    pixels = base.image_processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    ids = resolve_vision_layers(vision_layers, base.num_vision_layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            encode_images(base, pixels[i:i + batch_size], ids, pool)
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="small")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12])
    ap.add_argument("--pool", type=int, default=2)
    args = ap.parse_args()

    import ray

    from pipelines.features import FeatureJob, run_features

    work = Path(tempfile.mkdtemp(prefix="crosslayer-bench-"))
    try:
        make_images(work / "images", args.n, args.image_size)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cpus = os.cpu_count() or 1
        results = {}
        # Ray Data cannot start an actor that reserves more than its share of the CPUs, so the one-actor run
        # reserves 1 CPU and uses all threads; decode tasks reserve half a CPU each
        for label, conc, per_actor, threads in [(f"1 actor x {cpus} threads", 1, 1.0, cpus),
                                                (f"{cpus} actors x 1 thread", cpus, 0.5, 1)]:
            out = work / f"cache-{conc}"
            job = FeatureJob(src=str(work / "images"), out=str(out), base=args.base, vision_layers=args.layers,
                             pool=args.pool, batch_size=args.batch_size, concurrency=conc, cpus_per_actor=per_actor,
                             threads=threads)
            summary = run_features(job)
            mtimes = sorted(f.stat().st_mtime for f in out.glob("part-*.parquet"))
            # steady state: images in shards 2..last over the time between the first and last shard
            summary["steady_img_per_s"] = round(args.batch_size * (len(mtimes) - 1) / (mtimes[-1] - mtimes[0]), 2)
            results[label] = summary
        shutil_sizes = {}
        for dtype in ("float16", "bfloat16", "int8"):
            out = work / f"cache-{dtype}"
            s = run_features(FeatureJob(src=str(work / "images"), out=str(out), base=args.base, vision_layers=args.layers,
                                        pool=args.pool, batch_size=args.batch_size, dtype=dtype,
                                        concurrency=1, threads=cpus))
            size = sum(f.stat().st_size for f in out.glob("part-*.parquet"))
            shutil_sizes[dtype] = size / s["rows"]
        ray.shutdown()
        bare = bare_loop(args.base, work / "images", args.layers, args.pool, args.batch_size, cpus)
        from cli_module.loading import load_base

        base = load_base(args.base)
        grid = base.grid
        n_sel = grid * grid
        n_pool = (grid // args.pool) ** 2
        fp32 = 4 * base.vision_config.hidden_size * (n_sel + len(args.layers) * n_pool)
        report = {"base": args.base, "n": args.n, "batch_size": args.batch_size, "threads": cpus,
                  "bare_img_per_s": round(bare, 2),
                  "pipeline": {k: {"end_to_end_img_per_s": v["img_per_s"], "seconds": v["seconds"],
                                   "end_to_end_ratio": round(v["img_per_s"] / bare, 3),
                                   "steady_img_per_s": v["steady_img_per_s"],
                                   "steady_ratio": round(v["steady_img_per_s"] / bare, 3)}
                               for k, v in results.items()},
                  "bytes_per_image": {**{k: round(v) for k, v in shutil_sizes.items()}, "float32 (raw)": fp32}}
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
