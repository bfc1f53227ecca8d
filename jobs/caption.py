"""Batch captioning: Ray Data reads an image bucket, an actor pool of fused models captions it with the KV cache.

  sources (folder | s3:// | manifest), minus those already in DEST ──decode + preprocess (CPU tasks, as the
  feature cache does)──> caption actors (base + adapter loaded once, on a GPU each in bfloat16 where the cluster
  has GPUs, else on CPU; cached features used where the cache has the image, the encoder otherwise)
  ──> DEST/part-*.parquet|jsonl, one row per input image, errors included.

Rows: source, image_id, caption, prompt_tokens, completion_tokens, adapter, error (null or the reason).
Shards are written atomically; a rerun captions only sources that have no row in DEST yet. Device, dtype,
actors and batch size: ``pipelines.compute``; sampling (temperature, top_p, seed, stop): ``pipelines.generation``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.compute import (
    Compute,
    add_compute_arguments,
    cluster_resources,
    place_model,
    resolve_compute,
)
from pipelines.features import decode_batch, list_sources
from pipelines.generation import (
    GenerationJob,
    add_sampling_arguments,
    complete,
    offline_engine,
    sampling_from_args,
)
from pipelines.images import DEFAULT_MAX_PIXELS
from pipelines.pixels import for_job, model_inputs

BATCH_CPU, BATCH_GPU = 8, 64  # default images per model call on each device

OUTPUT_SCHEMA = pa.schema([("source", pa.string()), ("image_id", pa.string()), ("caption", pa.string()),
                           ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                           ("adapter", pa.string()), ("error", pa.string())])


@dataclass
class CaptionJob(GenerationJob):
    """Arguments of `crosslayer caption`."""

    src: str  # folder, s3:// prefix or manifest
    out: str  # destination folder or s3:// prefix
    adapter: str | None = None  # adapter folder; None captions with the base as is (one_to_one)
    base: str | None = None  # base to load (default: the one named in the adapter)
    prompt: str = "Describe the image briefly."  # the question asked about every image
    max_new_tokens: int = 32  # generation budget per caption
    batch_size: int = 0  # images per generate() call and per shard; 0: 8 on cpu, 64 on cuda
    concurrency: int = 0  # caption actors; 0: one per GPU share on cuda, 1 on cpu
    features: str | None = None  # feature cache to read instead of running the encoder, where it has the image
    format: Literal["parquet", "jsonl"] = "parquet"  # shard format
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap
    device: str = "auto"  # auto: cuda when the Ray cluster has GPUs, else cpu
    dtype: str = "auto"  # model dtype; auto: bfloat16 on cuda, float32 on cpu
    gpus_per_actor: float = 1.0  # GPUs Ray reserves per caption actor on cuda
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass
    seed: int | None = None  # sampling seed (per model call)
    stop: list[str] = field(default_factory=list)  # captions end before the first of these strings

    def __post_init__(self) -> None:
        if self.adapter is None and self.base is None:
            raise ValueError("give --adapter DIR, or --base BASE to caption with the base VLM as is")
        if self.format not in ("parquet", "jsonl"):
            raise ValueError(f"format={self.format!r} is not one of ['parquet', 'jsonl']")
        self.compute_spec()  # validates device, dtype, concurrency, batch size
        self.sampling()  # validates the sampling settings



class Captioner:
    """Actor: loads the fused model once (and the feature cache index, if any); captions one batch per call."""

    def __init__(self, job: CaptionJob, compute: Compute):
        import torch

        from cli_module.adapter import load_model
        from cli_module.prompting import chat_prompt
        from pipelines.feature_cache import CacheLookup

        if compute.device == "cpu":
            torch.set_num_threads(max(1, int(compute.num_cpus)))
        self.job, self.sampling = job, job.sampling()
        model, self.adapter_id = load_model(job.adapter, job.base, dtype=compute.torch_dtype())
        self.model = place_model(model, compute)
        self.engine = offline_engine(self.model)  # one decoding engine for every batch of this actor
        weight = next(self.model.parameters())  # what the actor really runs on, reported per row
        self.dtype, self.device = str(weight.dtype).removeprefix("torch."), weight.device.type
        self.prompt = chat_prompt(self.model.base.tokenizer, job.prompt, family=self.model.base.kind)
        self.cache = None  # refuses a cache made for other layers or pooling
        if job.features:
            self.cache = CacheLookup(job.features, self.model.base, self.model.vision_layers, self.model.config.pool,
                                     deepstack=self.model.base_deepstack)

    def _features(self, batch: dict[str, np.ndarray], good: list[int]):

        ids = [batch["image_id"][i] for i in good]
        if self.cache is not None and all(i in self.cache for i in ids):
            return self.cache.features(ids)
        pixels, grids = model_inputs(batch["pixels"][good], batch["image_grid_thw"][good])  # crops, or Qwen's patches
        return self.model.encode_images(pixels, image_grid_thw=grids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["source"])
        captions, prompt_tok, completion_tok = [None] * n, [0] * n, [0] * n
        errors = [e or None for e in batch["error"]]
        good = [i for i in range(n) if not errors[i]]
        if good:
            try:
                with torch.no_grad():
                    inputs, visual = self.model.prepare_inputs([self.prompt] * len(good),
                                                               features=self._features(batch, good))
                    done = complete(self.model, inputs, visual, self.sampling, self.engine)
                lengths = inputs["attention_mask"].sum(1).tolist()
                for j, i in enumerate(good):
                    captions[i] = done[j].text
                    prompt_tok[i], completion_tok[i] = int(lengths[j]), done[j].tokens
            except Exception as exc:  # a failing batch is recorded, never drops its rows
                for i in good:
                    errors[i] = f"{type(exc).__name__}: {exc}"[:500]
        rows = [{"source": str(batch["source"][i]), "image_id": str(batch["image_id"][i]) or None,
                 "caption": captions[i], "prompt_tokens": prompt_tok[i], "completion_tokens": completion_tok[i],
                 "adapter": self.adapter_id, "error": errors[i]} for i in range(n)]
        write_shard(self.job.out, rows, self.job.format)
        return {"source": batch["source"], "ok": np.array([e is None for e in errors]),
                "dtype": np.array([self.dtype] * n), "device": np.array([self.device] * n)}


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
    """Caption every source of ``job.src`` not yet in ``job.out``; returns the summary (with the compute used)."""
    from cli_module.adapter import load_model
    from pipelines.feature_cache import check_serves

    t0 = time.time()
    sources = list_sources(job.src)
    storage.check_writable(job.out)
    storage.remove_temporaries(job.out)
    done = {r["source"] for r in read_captions(job.out)}
    todo = [s for s in sources if s not in done]
    model, _ = load_model(job.adapter, job.base, weights=False)  # fail fast on a bad adapter; the processor
    if job.features:  # refuse a cache made for other layers or pooling before any work
        check_serves(job.features, model.base, model.vision_layers, model.config.pool, model.base_deepstack)
    processor = model.base.image_processor
    del model
    compute = resolve_compute(job.compute_spec(), cluster_resources(), BATCH_CPU, BATCH_GPU)
    rows = []
    if todo:
        rows = caption_dataset(job, compute, todo, processor).take_all()
    ok = sum(bool(r["ok"]) for r in rows)
    seconds = time.time() - t0
    return {"images": len(sources), "captioned": ok, "failed": len(rows) - ok, "skipped": len(sources) - len(todo),
            "seconds": round(seconds, 2), "img_per_s": round(len(rows) / seconds, 3) if seconds else 0.0,
            "compute": compute.describe(), "dtypes_used": sorted({str(r["dtype"]) for r in rows}),
            "devices_used": sorted({str(r["device"]) for r in rows})}


def caption_dataset(job: CaptionJob, compute: Compute, todo: list[str], processor):
    """The (lazy) Ray Dataset of the job: decode tasks on CPUs, then the caption actor pool with ``compute``'s
    resources (what ``map_batches`` is given is ``compute.map_kwargs()``)."""
    import ray

    ds = ray.data.from_items([{"source": s} for s in todo])
    processor, cap = for_job(processor, job.max_pixels)  # a Qwen base resizes to --max-pixels instead of refusing
    ds = ds.map_batches(decode_batch, batch_size=compute.batch_size, batch_format="numpy",
                        fn_kwargs={"processor": processor, "max_pixels": cap})
    return ds.map_batches(Captioner, batch_format="numpy", **compute.map_kwargs(),
                          fn_constructor_kwargs={"job": job, "compute": compute})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption an image folder / bucket / manifest with a fused model (Ray Data)")
    p.add_argument("src", help="image folder, s3://bucket/prefix, or manifest")
    p.add_argument("--adapter", help="adapter folder (from crosslayer train)")
    p.add_argument("--base", help="base to load; alone, captions with the base VLM as is")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--prompt", default=CaptionJob.prompt)
    add_sampling_arguments(p, max_new_tokens=32)
    add_compute_arguments(p, BATCH_CPU, BATCH_GPU)
    p.add_argument("--features", help="feature cache to use where it has the image")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    job = CaptionJob(src=args.src, out=args.out, adapter=args.adapter, base=args.base, prompt=args.prompt,
                     max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                     seed=sampling.seed, stop=sampling.stop, batch_size=args.batch_size,
                     concurrency=args.concurrency, device=args.device, dtype=args.compute_dtype,
                     gpus_per_actor=args.gpus_per_actor, features=args.features, format=args.format,
                     max_pixels=args.max_pixels)
    summary = run_caption(job)  # SourceError / ValueError become one line and exit 2 in cli.main
    c = summary["compute"]
    print(f"caption: {summary['captioned']} captioned, {summary['failed']} failed (rows with an error), "
          f"{summary['skipped']} already in {job.out}; {c['concurrency']} actor(s) on {c['device']} in {c['dtype']}"
          + (f" ({c['notes']})" if c["notes"] else ""))
    print(json.dumps(summary))
    return 0
