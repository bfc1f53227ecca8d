"""Batch captioning: Ray Data reads an image bucket, an actor pool of fused models captions it with the KV cache.

  sources (folder | s3:// | manifest), minus those already in DEST ──decode + preprocess (as the feature
  cache does)──> caption actors (base + adapter loaded once; cached features used where the cache has the
  image, the encoder otherwise) ──> DEST/part-*.parquet|jsonl, one row per input image, errors included.

Rows: source, image_id, caption, prompt_tokens, completion_tokens, adapter, error (null or the reason).
Shards are written atomically; a rerun captions only sources that have no row in DEST yet.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .features import DEFAULT_MAX_PIXELS, decode_batch, list_sources

OUTPUT_SCHEMA = pa.schema([("source", pa.string()), ("image_id", pa.string()), ("caption", pa.string()),
                           ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                           ("adapter", pa.string()), ("error", pa.string())])


@dataclass
class CaptionJob:
    """Arguments of `crosslayer caption`."""

    src: str  # folder, s3:// prefix or manifest
    out: str  # destination folder or s3:// prefix
    adapter: str | None = None  # adapter folder; None captions with the base as is (one_to_one)
    base: str | None = None  # base to load (default: the one named in the adapter)
    prompt: str = "Describe the image briefly."  # the question asked about every image
    max_new_tokens: int = 32  # generation budget per caption
    batch_size: int = 8  # images per generate() call and per shard
    concurrency: int = 1  # caption actors
    features: str | None = None  # feature cache to read instead of running the encoder, where it has the image
    format: Literal["parquet", "jsonl"] = "parquet"  # shard format
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap

    def __post_init__(self) -> None:
        if self.adapter is None and self.base is None:
            raise ValueError("give --adapter DIR, or --base BASE to caption with the base VLM as is")
        if self.format not in ("parquet", "jsonl"):
            raise ValueError(f"format={self.format!r} is not one of ['parquet', 'jsonl']")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}), batch_size ({self.batch_size}) and "
                             f"concurrency ({self.concurrency}) must be >= 1")


class Captioner:
    """Actor: loads the fused model once (and the feature cache index, if any); captions one batch per call."""

    def __init__(self, job: CaptionJob):
        import torch

        from cli_module.adapter import load_model
        from cli_module.prompting import chat_prompt

        from .feature_cache import CacheLookup

        torch.set_num_threads(1)
        self.job = job
        self.model, self.adapter_id = load_model(job.adapter, job.base)
        self.prompt = chat_prompt(self.model.base.tokenizer, job.prompt)
        self.cache = None  # refuses a cache made for other layers or pooling
        if job.features:
            self.cache = CacheLookup(job.features, self.model.base, self.model.vision_layers, self.model.config.pool)

    def _features(self, batch: dict[str, np.ndarray], good: list[int]):
        import torch

        ids = [batch["image_id"][i] for i in good]
        if self.cache is not None and all(i in self.cache for i in ids):
            return self.cache.features(ids)
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
        return self.model.encode_images(pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["source"])
        captions, prompt_tok, completion_tok = [None] * n, [0] * n, [0] * n
        errors = [e or None for e in batch["error"]]
        good = [i for i in range(n) if not errors[i]]
        if good:
            try:
                tok = self.model.base.tokenizer
                with torch.no_grad():
                    inputs, visual = self.model.prepare_inputs([self.prompt] * len(good),
                                                               features=self._features(batch, good))
                    tokens, _ = self.model.generate(**inputs, visual=visual, max_new_tokens=self.job.max_new_tokens,
                                                    eos_token_id=tok.eos_token_id)
                lengths = inputs["attention_mask"].sum(1).tolist()
                for j, i in enumerate(good):
                    row = tokens[j].tolist()
                    used = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
                    captions[i] = tok.decode(used, skip_special_tokens=True).strip()
                    prompt_tok[i], completion_tok[i] = int(lengths[j]), len(used)
            except Exception as exc:  # a failing batch is recorded, never drops its rows
                for i in good:
                    errors[i] = f"{type(exc).__name__}: {exc}"[:500]
        rows = [{"source": str(batch["source"][i]), "image_id": str(batch["image_id"][i]) or None,
                 "caption": captions[i], "prompt_tokens": prompt_tok[i], "completion_tokens": completion_tok[i],
                 "adapter": self.adapter_id, "error": errors[i]} for i in range(n)]
        write_shard(self.job.out, rows, self.job.format)
        return {"source": batch["source"], "ok": np.array([e is None for e in errors])}


def write_shard(out: str, rows: list[dict], fmt: str) -> None:
    if fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), sink)
        data = sink.getvalue()
    storage.write_atomic(storage.join(out, f"part-{uuid.uuid4().hex}.{fmt}"), data)


def read_captions(out: str) -> list[dict]:
    """Every row written to DEST so far (both formats)."""
    rows: list[dict] = []
    try:
        files = storage.list_files(out)
    except storage.SourceError:
        return rows
    for uri in files:
        name = uri.rsplit("/", 1)[-1]
        if not name.startswith("part-"):
            continue
        data = storage.read_bytes(uri)
        if name.endswith(".parquet"):
            rows.extend(pq.read_table(io.BytesIO(data)).to_pylist())
        elif name.endswith(".jsonl"):
            rows.extend(json.loads(x) for x in data.decode().splitlines() if x.strip())
    return rows


def run_caption(job: CaptionJob) -> dict:
    import ray

    from cli_module.adapter import load_model

    from .feature_cache import check_serves

    t0 = time.time()
    sources = list_sources(job.src)
    storage.check_writable(job.out)
    storage.remove_temporaries(job.out)
    done = {r["source"] for r in read_captions(job.out)}
    todo = [s for s in sources if s not in done]
    model, _ = load_model(job.adapter, job.base, weights=False)  # fail fast on a bad adapter; the processor
    if job.features:  # refuse a cache made for other layers or pooling before any work
        check_serves(job.features, model.base, model.vision_layers, model.config.pool)
    processor = model.base.image_processor
    del model
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    rows = []
    if todo:
        ds = ray.data.from_items([{"source": s} for s in todo])
        ds = ds.map_batches(decode_batch, batch_size=job.batch_size, batch_format="numpy",
                            fn_kwargs={"processor": processor, "max_pixels": job.max_pixels})
        ds = ds.map_batches(Captioner, batch_size=job.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=job.concurrency),
                            fn_constructor_kwargs={"job": job})
        rows = ds.take_all()
    ok = sum(bool(r["ok"]) for r in rows)
    seconds = time.time() - t0
    return {"images": len(sources), "captioned": ok, "failed": len(rows) - ok, "skipped": len(sources) - len(todo),
            "seconds": round(seconds, 2), "img_per_s": round(len(rows) / seconds, 3) if seconds else 0.0}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption an image folder / bucket / manifest with a fused model (Ray Data)")
    p.add_argument("src", help="image folder, s3://bucket/prefix, or manifest")
    p.add_argument("--adapter", help="adapter folder (from crosslayer train)")
    p.add_argument("--base", help="base to load; alone, captions with the base VLM as is")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--prompt", default=CaptionJob.prompt)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--features", help="feature cache to use where it has the image")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    job = CaptionJob(src=args.src, out=args.out, adapter=args.adapter, base=args.base, prompt=args.prompt,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, concurrency=args.concurrency,
                     features=args.features, format=args.format, max_pixels=args.max_pixels)
    summary = run_caption(job)  # SourceError / ValueError become one line and exit 2 in cli.main
    print(f"caption: {summary['captioned']} captioned, {summary['failed']} failed (rows with an error), "
          f"{summary['skipped']} already in {job.out}")
    print(json.dumps(summary))
    return 0
