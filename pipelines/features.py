"""Feature cache: Ray Data precomputes the frozen encoder's multi-layer features once, as Parquet shards.

  sources (folder | s3:// prefix | manifest) ──list──> Ray Data ──decode + preprocess (tasks)──>
  encoder actor pool (loads the base's encoder once, on a GPU each in bfloat16 where the cluster has GPUs,
  else on CPU; per batch: hidden states -> select layer + layers K, pooled, cast to the storage dtype; writes
  one shard atomically) ──> DEST/part-*.parquet + DEST/errors.parquet + DEST/cache.json

Rows: ``image_id`` (sha256 of the bytes), ``source``, ``select`` (N, Dv) and ``layers`` (K, N', Dv) as Arrow
fixed-shape tensors in float16 / bfloat16 (stored as its uint16 bits) / int8 (+ ``*_scale`` per token). A Qwen
base's rows have a token count each, their ``image_grid_thw`` and (Qwen3-VL) the DeepStack blocks
(``pipelines.feature_cache``); ``--max-pixels`` bounds its processor's pixels, hence the count, as the processor's
``max_pixels`` does (larger images are resized down, not refused).
A rerun encodes only images whose id is not in a shard yet; bad files become rows of ``errors.parquet``.
The format (key, column codecs, readers) lives in ``pipelines.feature_cache``; the actors' device, compute dtype
(``--compute-dtype``; ``--dtype`` is the storage dtype), count and batch size in ``pipelines.compute``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cli_module.config import resolve_vision_layers

from . import storage
from .compute import Compute, ComputeSpec, add_compute_arguments, cluster_resources, resolve_compute
from .feature_cache import (
    CACHE_FILE,
    ERRORS_FILE,
    CacheKey,
    Dtype,
    cache_key_for,
    cached_ids,
    encode_column,
    encode_rows,
)
from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .pixels import for_job, model_inputs, preprocess

BATCH_CPU, BATCH_GPU = 16, 128  # default images per encoder call (and per shard) on each device


@dataclass
class FeatureJob:
    """Arguments of `crosslayer features`."""

    src: str  # folder, s3:// prefix, or manifest (.jsonl / .parquet with an image column)
    out: str  # destination folder or s3:// prefix
    base: str = "tiny"  # base whose encoder and image processor are used
    vision_layers: list[int] = field(default_factory=lambda: [-2, -5, -8, -11])  # hidden_states indices K
    pool: int = 1  # average pooling of `layers` (1 = none)
    dtype: Dtype = "float16"  # storage dtype
    batch_size: int = 0  # images per encoder call and per shard; 0: 16 on cpu, 128 on cuda
    concurrency: int = 0  # encoder actors; 0: one per GPU share on cuda, 1 on cpu
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per encoder actor (keep <= 1 on a 2-core machine)
    threads: int = 0  # torch threads per encoder actor on cpu; 0 = ceil(cpus_per_actor)
    cpus_per_decode: float = 0.5  # CPUs reserved per decode task (fractional, so decoding fits beside the actors)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels are refused (decompression bombs); a Qwen base
    #                                       resizes them down to it instead (its processor's max_pixels, if lower)
    image_root: str | None = None  # folder / s3:// prefix a manifest's relative image paths are under
    device: str = "auto"  # encoder device; auto: cuda when the Ray cluster has GPUs, else cpu
    compute_dtype: str = "auto"  # encoder dtype; auto: bfloat16 on cuda, float32 on cpu (stored as `dtype`)
    gpus_per_actor: float = 1.0  # GPUs Ray reserves per encoder actor on cuda

    def __post_init__(self) -> None:
        if self.image_root and not self.src.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"image_root={self.image_root!r} applies to a manifest (.json/.jsonl/.parquet), "
                             f"and {self.src!r} is a folder: drop --image-root or point at the manifest")
        if self.dtype not in ("float16", "bfloat16", "int8"):
            raise ValueError(f"dtype={self.dtype!r} is not one of ['float16', 'bfloat16', 'int8']")
        if self.pool < 1 or self.threads < 0:
            raise ValueError(f"pool ({self.pool}) must be >= 1 and threads ({self.threads}) >= 0")
        self.compute_spec()  # validates device, compute dtype, concurrency, batch size, per-actor resources

    def compute_spec(self) -> ComputeSpec:
        return ComputeSpec(device=self.device, dtype=self.compute_dtype, concurrency=self.concurrency,
                           gpus_per_actor=self.gpus_per_actor, cpus_per_actor=self.cpus_per_actor,
                           batch_size=self.batch_size)


# --- sources -----------------------------------------------------------------------------------------

def list_sources(src: str, image_root: str | None = None) -> list[str]:
    """Image URIs of a folder / prefix, or the image column of a manifest (LLaVA's data files are manifests);
    relative paths resolve against ``image_root``, else the manifest's folder. Rows without an image (LLaVA's
    text-only conversations) are skipped."""
    if src.endswith((".jsonl", ".json", ".parquet")) and storage.exists(src):
        if src.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(storage.read_bytes(src)))
            records = table.to_pylist()
        else:
            text = storage.read_bytes(src).decode()
            records = json.loads(text) if src.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
        column = next((c for c in ("image", "image_path", "path", "url", "source")
                       if any(isinstance(r, dict) and c in r for r in records)), None)
        if column is None:
            raise storage.SourceError(f"{src}: manifest has no image column (image, image_path, path, url or source)")
        root = image_root or (src.rsplit("/", 1)[0] if src.startswith("s3://") else os.path.dirname(os.path.abspath(src)))
        paths = [str(r[column]) for r in records if isinstance(r, dict) and r.get(column)]
        out = sorted({p if p.startswith(("s3://", "/")) else storage.join(root, p) for p in paths})
        if not out:
            raise storage.SourceError(f"{src}: manifest lists no images")
        return out
    return storage.list_files(src)


def decode_batch(batch: dict[str, np.ndarray], processor: Any, max_pixels: int) -> dict[str, np.ndarray]:
    """Read, hash, validate, decode and preprocess each source with the base's own image processor
    (``pipelines.pixels``: fixed crops, or a Qwen base's patches + ``image_grid_thw``); bad files keep a row with
    `error` set (and zero pixels)."""
    ids, errors, images = [], [], []
    for src in batch["source"]:
        image, err, image_id = None, None, None
        try:
            data = storage.read_bytes(str(src))
            image_id = hashlib.sha256(data).hexdigest()[:32]
            image = decode_image(data, max_pixels)
        except Exception as exc:  # one bad file never stops the run
            err = str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        ids.append(image_id or "")
        errors.append(err or "")
        images.append(image)
    return {"source": batch["source"], "image_id": np.array(ids), "error": np.array(errors),
            **preprocess(processor, images)}


class Encoder:
    """Actor: loads the base's encoder once (the LLM stays on the meta device) on ``compute``'s device and dtype,
    encodes a batch, writes it as one shard (temp name + rename) in the storage ``dtype``."""

    def __init__(self, base_name: str, vision_layers: list[int], pool: int, dtype: Dtype, out: str,
                 threads: int = 1, compute: Compute | None = None):
        import torch

        from cli_module.loading import load_base

        compute = compute or Compute(device="cpu", dtype="float32", concurrency=1, num_gpus=0.0, num_cpus=1.0,
                                     batch_size=BATCH_CPU)
        if compute.device == "cpu":
            torch.set_num_threads(threads)
        elif not torch.cuda.is_available():
            raise RuntimeError("this encoder actor was scheduled for cuda but sees no CUDA device")
        self.base = load_base(base_name, language=False, dtype=compute.torch_dtype())
        self.base.vision_tower.to(compute.device)  # the LLM and projector stay on the meta device
        weight = next(self.base.vision_tower.parameters())
        self.compute_dtype, self.device = str(weight.dtype).removeprefix("torch."), weight.device.type
        self.vision_layers = resolve_vision_layers(vision_layers, self.base.num_vision_layers)
        self.pool, self.dtype, self.out = pool, dtype, out
        self.deepstack = self.base.kind == "qwen3_vl"  # its own DeepStack's blocks, for every method but one_to_one

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cli_module.model import encode_images

        good = [i for i, e in enumerate(batch["error"]) if not e]
        written = np.zeros(len(batch["source"]), dtype=np.int64)
        if good:
            grids = np.asarray(batch["image_grid_thw"])[good] if "image_grid_thw" in batch else None
            pixels, grid_thw = model_inputs(batch["pixels"][good], grids)  # (B, C, H, W) or (sum P_i, C'), (B, 3)
            with torch.no_grad():
                feats = encode_images(self.base, pixels, self.vision_layers, self.pool, image_grid_thw=grid_thw,
                                      deepstack=self.deepstack)
            columns = {"image_id": pa.array([batch["image_id"][i] for i in good]),
                       "source": pa.array([str(batch["source"][i]) for i in good])}
            if feats.grids is None:
                columns.update(encode_column("select", feats.select_features.cpu(), self.dtype))
                columns.update(encode_column("layers", feats.layers.cpu(), self.dtype))
            else:  # a Qwen base: each row its own token count, the padding dropped
                from cli_module.qwen import merge_size, token_counts

                counts = token_counts(feats.grids.cpu(), merge_size(self.base))
                columns["tokens"] = pa.array(counts, type=pa.int32())
                columns["image_grid_thw"] = pa.FixedShapeTensorArray.from_numpy_ndarray(
                    feats.grids.cpu().numpy().astype(np.int32))
                named = {"select": feats.select_features[:, None], "layers": feats.layers, "deepstack": feats.deepstack}
                for name, x in named.items():  # (B, J, N, D) padded -> per row (J, N_i, D)
                    if x is not None:
                        rows = [r[:, :n].cpu() for r, n in zip(x, counts)]
                        columns.update(encode_rows(name, [r[0] for r in rows] if name == "select" else rows,
                                                   self.dtype))
            sink = io.BytesIO()
            pq.write_table(pa.table(columns), sink, row_group_size=1)  # one image per row group: streamed reads
            storage.write_atomic(storage.join(self.out, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue())
            written[good] = sink.tell() // len(good)
        n = len(batch["source"])
        return {"source": batch["source"], "image_id": batch["image_id"], "error": batch["error"], "bytes": written,
                "compute_dtype": np.array([self.compute_dtype] * n), "device": np.array([self.device] * n)}


# --- the job -----------------------------------------------------------------------------------------

def run_features(job: FeatureJob) -> dict[str, Any]:
    """Build or extend a cache; returns the summary. Errors about SRC/DEST are raised before any work."""
    from cli_module.loading import load_base

    t0 = time.time()
    sources = list_sources(job.src, job.image_root)
    storage.check_writable(job.out)
    base = load_base(job.base, weights=False)  # configs and processor only: the key, the layer range check
    if base.qwen and job.pool != 1:
        raise ValueError(f"--pool {job.pool}: a Qwen base's token grid varies per image (its 2x2 merger already "
                         f"merges patches); use --pool 1")
    processor, _ = for_job(base.image_processor, job.max_pixels)  # a Qwen processor's max_pixels <= --max-pixels
    key = cache_key_for(base, job.vision_layers, job.pool, job.dtype, max_pixels=job.max_pixels)
    cache_json = storage.join(job.out, CACHE_FILE)
    if storage.exists(cache_json):
        old = CacheKey(**storage.read_json(cache_json)["key"])
        if old.diff(key):
            raise ValueError(f"{job.out} already holds a different cache ({'; '.join(old.diff(key))}); "
                             f"use another --out")
    storage.remove_temporaries(job.out)
    done_ids = cached_ids(job.out)
    compute = resolve_compute(job.compute_spec(), cluster_resources(), BATCH_CPU, BATCH_GPU)
    rows = features_dataset(job, compute, sources, processor, done_ids).take_all()
    skipped = len(sources) - len(rows)
    failed = [{"source": str(r["source"]), "image_id": str(r["image_id"]) or None, "reason": str(r["error"])}
              for r in rows if r["error"]]
    done = sum(1 for r in rows if not r["error"])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(failed, schema=pa.schema([("source", pa.string()), ("image_id", pa.string()),
                                                                  ("reason", pa.string())])), sink)
    storage.write_atomic(storage.join(job.out, ERRORS_FILE), sink.getvalue())
    total = len(cached_ids(job.out))
    storage.write_json(cache_json, {"key": key.to_json(), "rows": total, "errors": len(failed),
                                    "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    seconds = time.time() - t0
    return {"images": len(sources), "done": done, "skipped": skipped, "failed": len(failed), "rows": total,
            "bytes_written": int(sum(int(r["bytes"]) for r in rows)), "seconds": round(seconds, 2),
            "img_per_s": round(done / seconds, 2) if seconds else 0.0, "compute": compute.describe(),
            "compute_dtypes_used": sorted({str(r["compute_dtype"]) for r in rows}),
            "devices_used": sorted({str(r["device"]) for r in rows})}


def features_dataset(job: FeatureJob, compute: Compute, sources: list[str], processor: Any, done_ids: set[str]):
    """The (lazy) Ray Dataset of the job: decode tasks on CPUs, drop cached images, then the encoder actor pool
    with ``compute``'s resources (its ``map_batches`` gets ``compute.map_kwargs()``)."""
    import ray

    ds = ray.data.from_items([{"source": s} for s in sources])
    _, cap = for_job(processor, job.max_pixels)  # a Qwen base resizes to its bound instead of refusing
    ds = ds.map_batches(decode_batch, batch_size=compute.batch_size, batch_format="numpy",
                        num_cpus=job.cpus_per_decode, fn_kwargs={"processor": processor, "max_pixels": cap})
    ds = ds.map_batches(_drop_cached, batch_format="numpy", fn_kwargs={"done": ray.put(done_ids)})
    return ds.map_batches(Encoder, batch_format="numpy", **compute.map_kwargs(),
                          fn_constructor_kwargs={"base_name": job.base, "vision_layers": job.vision_layers,
                                                 "pool": job.pool, "dtype": job.dtype, "out": job.out,
                                                 "threads": job.threads or max(1, math.ceil(job.cpus_per_actor)),
                                                 "compute": compute})


def _drop_cached(batch: dict[str, np.ndarray], done: Any) -> dict[str, np.ndarray]:
    import ray

    done_ids = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    keep = np.array([not (i and i in done_ids) for i in batch["image_id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


# --- command line ------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="precompute multi-layer vision features into a Parquet cache (Ray Data)")
    p.add_argument("src", nargs="?", help="image folder, s3://bucket/prefix, or manifest (.jsonl/.json/.parquet with an "
                                          "image column)")
    p.add_argument("--out", help="cache folder or s3:// prefix (required unless --estimate)")
    p.add_argument("--base", default="tiny")
    p.add_argument("--layers", dest="vision_layers", type=int, nargs="+", default=[-2, -5, -8, -11],
                   help="the vision layers K to cache: hidden_states indices (negative count from the end)")
    p.add_argument("--pool", type=int, default=1)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "int8"], default="float16",
                   help="storage dtype of the cached features (the encoder's own dtype: --compute-dtype)")
    add_compute_arguments(p, BATCH_CPU, BATCH_GPU, dtype_flag="--compute-dtype")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per encoder actor")
    p.add_argument("--threads", type=int, default=0, help="torch threads per encoder actor (0: from --cpus-per-actor)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are refused; a Qwen base resizes them down to it instead, as its "
                        "processor's max_pixels does (bounding each image's token count)")
    p.add_argument("--image-root", help="folder or s3:// prefix a manifest's relative image paths are under "
                                        "(LLaVA's 665K mix: the folder holding coco/, gqa/, ...)")
    p.add_argument("--estimate", action="store_true", help="print the cache's size (bytes per image, total, shards) "
                                                           "for --images (or SRC's image count); encode nothing")
    p.add_argument("--images", type=int, help="with --estimate: the image count (default: count SRC's images)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.estimate:
        return _estimate(args)
    if args.images is not None:
        raise ValueError("--images goes with --estimate")
    if not args.src or not args.out:
        raise ValueError("give SRC and --out DEST (or --estimate to size a cache without building it)")
    job = FeatureJob(src=args.src, out=args.out, base=args.base, vision_layers=args.vision_layers, pool=args.pool,
                     dtype=args.dtype, batch_size=args.batch_size, concurrency=args.concurrency,
                     cpus_per_actor=args.cpus_per_actor, threads=args.threads, max_pixels=args.max_pixels,
                     image_root=args.image_root, device=args.device, compute_dtype=args.compute_dtype,
                     gpus_per_actor=args.gpus_per_actor)
    summary = run_features(job)  # SourceError / ValueError become one line and exit 2 in cli.main
    print(f"features: {summary['done']} images encoded, {summary['skipped']} skipped (already cached), "
          f"{summary['failed']} failed (see {ERRORS_FILE}), {summary['rows']} rows in the cache, "
          f"{summary['bytes_written']:,} bytes written, {summary['img_per_s']} img/s; "
          f"{summary['compute']['concurrency']} encoder(s) on {summary['compute']['device']} in "
          f"{summary['compute']['dtype']}" + (f" ({summary['compute']['notes']})" if summary['compute']['notes'] else ""))
    print(json.dumps(summary))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    """``--estimate``: the size of the cache these arguments would build, from the encoder's shapes alone."""
    from cli_module.loading import load_base

    from .feature_cache import estimate

    if args.images is None and not args.src:
        raise ValueError("--estimate needs --images N or SRC to count")
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    images = args.images if args.images is not None else len(list_sources(args.src, args.image_root))
    base = load_base(args.base, weights=False)  # configs only: nothing encoded, no weights read
    e = estimate(base, args.vision_layers, args.pool, args.dtype, images, args.batch_size or BATCH_CPU)
    print(f"features --estimate: {e['bytes_per_image'] / 2**20:.2f} MiB per image x {images:,} images = "
          f"{e['total_bytes'] / 2**30:,.1f} GiB in {e['shards']:,} shards ({args.base}, layers "
          f"{' '.join(map(str, args.vision_layers))}, pool {args.pool}, {args.dtype}; shapes {e['shapes']})")
    print(json.dumps(e))
    return 0
