"""Feature cache: Ray Data precomputes the frozen encoder's multi-layer features once, as Parquet shards.

  sources (folder | s3:// prefix | manifest) ──list──> Ray Data ──decode + preprocess (tasks)──>
  encoder actor pool (loads the base once; per batch: hidden states -> select layer + layers K, pooled,
  cast; writes one shard atomically) ──> DEST/part-*.parquet + DEST/errors.parquet + DEST/cache.json

Rows: ``image_id`` (sha256 of the bytes), ``source``, ``select`` (N, Dv) and ``layers`` (K, N', Dv) as Arrow
fixed-shape tensors in float16 / bfloat16 (stored as its uint16 bits) / int8 (+ ``*_scale`` per token).
A rerun encodes only images whose id is not in a shard yet; bad files become rows of ``errors.parquet``.
The format (key, column codecs, readers) lives in ``pipelines.feature_cache``.
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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cli_module.config import resolve_vision_layers

from . import storage
from .feature_cache import (
    CACHE_FILE,
    ERRORS_FILE,
    CacheKey,
    Dtype,
    cache_key_for,
    cached_ids,
    encode_column,
)

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # decompression-bomb cap, as PIL's own default order of magnitude


@dataclass
class FeatureJob:
    """Arguments of `crosslayer features`."""

    src: str  # folder, s3:// prefix, or manifest (.jsonl / .parquet with an image column)
    out: str  # destination folder or s3:// prefix
    base: str = "tiny"  # base whose encoder and image processor are used
    vision_layers: list[int] = field(default_factory=lambda: [-2, -5, -8, -11])  # hidden_states indices K
    pool: int = 1  # average pooling of `layers` (1 = none)
    dtype: Dtype = "float16"  # storage dtype
    batch_size: int = 16  # images per encoder call and per shard
    concurrency: int = 1  # encoder actors
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per encoder actor (keep <= 1 on a 2-core machine)
    threads: int = 0  # torch threads per encoder actor; 0 = ceil(cpus_per_actor)
    cpus_per_decode: float = 0.5  # CPUs reserved per decode task (fractional, so decoding fits beside the actors)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels are refused (decompression bombs)
    image_root: str | None = None  # folder / s3:// prefix a manifest's relative image paths are under

    def __post_init__(self) -> None:
        if self.image_root and not self.src.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"image_root={self.image_root!r} applies to a manifest (.json/.jsonl/.parquet), "
                             f"and {self.src!r} is a folder: drop --image-root or point at the manifest")
        if self.dtype not in ("float16", "bfloat16", "int8"):
            raise ValueError(f"dtype={self.dtype!r} is not one of ['float16', 'bfloat16', 'int8']")
        if self.batch_size < 1 or self.concurrency < 1 or self.pool < 1:
            raise ValueError(f"batch_size ({self.batch_size}), concurrency ({self.concurrency}) and pool "
                             f"({self.pool}) must be >= 1")


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
    """Read, hash, validate, decode and preprocess each source with the base's own image processor;
    bad files keep a row with `error` set (and zero pixels)."""
    from PIL import Image, UnidentifiedImageError

    ids, errors, images = [], [], []
    for src in batch["source"]:
        image, err, image_id = None, None, None
        try:
            data = storage.read_bytes(str(src))
            image_id = hashlib.sha256(data).hexdigest()[:32]
            if not data:
                raise ValueError("empty file (0 bytes)")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the cap {max_pixels}")
                image = im.convert("RGB")  # forces a full decode: truncated files fail here
        except UnidentifiedImageError:
            err = "not an image: PIL cannot identify the format"
        except Exception as exc:  # one bad file never stops the run
            err = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        ids.append(image_id or "")
        errors.append(err or "")
        images.append(image)
    good = [im for im in images if im is not None]
    pixels = processor(images=good, return_tensors="np")["pixel_values"] if good else None
    if pixels is not None:
        from cli_module.model import whole_image_crop

        pixels = whole_image_crop(pixels)  # LLaVA-OneVision: the whole-image crop, as every job feeds the model
    shape = pixels.shape[1:] if pixels is not None else (3, 1, 1)
    out = np.zeros((len(images), *shape), dtype=np.float32)
    if pixels is not None:
        out[[i for i, im in enumerate(images) if im is not None]] = pixels
    return {"source": batch["source"], "image_id": np.array(ids), "error": np.array(errors), "pixels": out}


class Encoder:
    """Actor: loads the base's encoder once (the LLM stays on the meta device), encodes a batch, writes it as one
    shard (temp name + rename)."""

    def __init__(self, base_name: str, vision_layers: list[int], pool: int, dtype: Dtype, out: str,
                 threads: int = 1):
        import torch

        from cli_module.loading import load_base

        torch.set_num_threads(threads)
        self.base = load_base(base_name, language=False)
        self.vision_layers = resolve_vision_layers(vision_layers, self.base.num_vision_layers)
        self.pool, self.dtype, self.out = pool, dtype, out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cli_module.model import encode_images

        good = [i for i, e in enumerate(batch["error"]) if not e]
        written = np.zeros(len(batch["source"]), dtype=np.int64)
        if good:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))  # (B, C, H, W)
            with torch.no_grad():
                feats = encode_images(self.base, pixels, self.vision_layers, self.pool)
            columns = {"image_id": pa.array([batch["image_id"][i] for i in good]),
                       "source": pa.array([str(batch["source"][i]) for i in good])}
            columns.update(encode_column("select", feats.select_features, self.dtype))
            columns.update(encode_column("layers", feats.layers, self.dtype))
            sink = io.BytesIO()
            pq.write_table(pa.table(columns), sink, row_group_size=1)  # one image per row group: streamed reads
            storage.write_atomic(storage.join(self.out, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue())
            written[good] = sink.tell() // len(good)
        return {"source": batch["source"], "image_id": batch["image_id"], "error": batch["error"], "bytes": written}


# --- the job -----------------------------------------------------------------------------------------

def run_features(job: FeatureJob) -> dict[str, Any]:
    """Build or extend a cache; returns the summary. Errors about SRC/DEST are raised before any work."""
    import ray

    from cli_module.loading import load_base

    t0 = time.time()
    sources = list_sources(job.src, job.image_root)
    storage.check_writable(job.out)
    base = load_base(job.base, weights=False)  # configs and processor only: the key, the layer range check
    key = cache_key_for(base, job.vision_layers, job.pool, job.dtype)
    cache_json = storage.join(job.out, CACHE_FILE)
    if storage.exists(cache_json):
        old = CacheKey(**storage.read_json(cache_json)["key"])
        if old.diff(key):
            raise ValueError(f"{job.out} already holds a different cache ({'; '.join(old.diff(key))}); "
                             f"use another --out")
    storage.remove_temporaries(job.out)
    done_ids = cached_ids(job.out)
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    ds = ray.data.from_items([{"source": s} for s in sources])
    ds = ds.map_batches(decode_batch, batch_size=job.batch_size, batch_format="numpy", num_cpus=job.cpus_per_decode,
                        fn_kwargs={"processor": base.image_processor, "max_pixels": job.max_pixels})
    ds = ds.map_batches(_drop_cached, batch_format="numpy", fn_kwargs={"done": ray.put(done_ids)})
    ds = ds.map_batches(Encoder, batch_size=job.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=job.concurrency), num_cpus=job.cpus_per_actor,
                        fn_constructor_kwargs={"base_name": job.base, "vision_layers": job.vision_layers, "pool": job.pool,
                                               "dtype": job.dtype, "out": job.out,
                                               "threads": job.threads or max(1, math.ceil(job.cpus_per_actor))})
    rows = ds.take_all()
    skipped = len(sources) - len(rows)
    failed = [{"source": str(r["source"]), "image_id": str(r["image_id"]) or None, "reason": str(r["error"])}
              for r in rows if r["error"]]
    done = sum(1 for r in rows if not r["error"])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(failed, schema=pa.schema([("source", pa.string()), ("image_id", pa.string()),
                                                                  ("reason", pa.string())])), sink)
    storage.write_atomic(storage.join(job.out, ERRORS_FILE), sink.getvalue())
    total = len(cached_ids(job.out))
    storage.write_json(cache_json, {"key": asdict(key), "rows": total, "errors": len(failed),
                                    "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    seconds = time.time() - t0
    return {"images": len(sources), "done": done, "skipped": skipped, "failed": len(failed), "rows": total,
            "bytes_written": int(sum(int(r["bytes"]) for r in rows)), "seconds": round(seconds, 2),
            "img_per_s": round(done / seconds, 2) if seconds else 0.0}


def _drop_cached(batch: dict[str, np.ndarray], done: Any) -> dict[str, np.ndarray]:
    import ray

    done_ids = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    keep = np.array([not (i and i in done_ids) for i in batch["image_id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


# --- command line ------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="precompute multi-layer vision features into a Parquet cache (Ray Data)")
    p.add_argument("src", help="image folder, s3://bucket/prefix, or manifest (.jsonl/.parquet with an image column)")
    p.add_argument("--out", required=True, help="cache folder or s3:// prefix")
    p.add_argument("--base", default="tiny")
    p.add_argument("--layers", dest="vision_layers", type=int, nargs="+", default=[-2, -5, -8, -11],
                   help="the vision layers K to cache: hidden_states indices (negative count from the end)")
    p.add_argument("--pool", type=int, default=1)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "int8"], default="float16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per encoder actor")
    p.add_argument("--threads", type=int, default=0, help="torch threads per encoder actor (0: from --cpus-per-actor)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--image-root", help="folder or s3:// prefix a manifest's relative image paths are under "
                                        "(LLaVA's 665K mix: the folder holding coco/, gqa/, ...)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    job = FeatureJob(src=args.src, out=args.out, base=args.base, vision_layers=args.vision_layers, pool=args.pool,
                     dtype=args.dtype, batch_size=args.batch_size, concurrency=args.concurrency,
                     cpus_per_actor=args.cpus_per_actor, threads=args.threads, max_pixels=args.max_pixels,
                     image_root=args.image_root)
    summary = run_features(job)  # SourceError / ValueError become one line and exit 2 in cli.main
    print(f"features: {summary['done']} images encoded, {summary['skipped']} skipped (already cached), "
          f"{summary['failed']} failed (see {ERRORS_FILE}), {summary['rows']} rows in the cache, "
          f"{summary['bytes_written']:,} bytes written, {summary['img_per_s']} img/s")
    print(json.dumps(summary))
    return 0
