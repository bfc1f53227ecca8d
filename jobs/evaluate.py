"""`crosslayer eval`: short-answer accuracy of a fused model (or the base as is) on LLaVA-format JSONL.

Records are joined to a feature cache by image (the record's `image` resolved against the JSONL's folder, or
an `image_id` field), answered greedily by an actor pool of models through Ray Data, and scored by normalised
exact match (``jobs.scoring``), overall and per question `type`. Writes a JSON report (accuracy, n, per_type)
and the predictions beside it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines import storage

from .scoring import answer_of, score
from .train_data import read_records, resolve_image


@dataclass
class EvalJob:
    """Arguments of `crosslayer eval`."""

    data: str  # LLaVA-format JSONL (local or s3://) with short answers and an optional `type`
    features: str  # feature cache holding the records' images
    adapter: str | None = None  # adapter folder; None evaluates the base as is (one_to_one)
    base: str | None = None  # base to load (default: the adapter's)
    out: str | None = None  # report path (JSON); predictions go to the same name with .predictions.jsonl
    max_new_tokens: int = 8  # answers are one to three words
    batch_size: int = 16  # records per generate() call
    concurrency: int = 1  # model actors

    def __post_init__(self) -> None:
        if self.adapter is None and self.base is None:
            raise ValueError("give --adapter DIR, or --base BASE to evaluate the base VLM as is")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}), batch_size ({self.batch_size}) and "
                             f"concurrency ({self.concurrency}) must be >= 1")


def load_records(path: str) -> list[dict[str, Any]]:
    """The file's records; a malformed line is an error naming it (evaluation skips nothing silently)."""
    rows = read_records(path)
    bad = [(n, err) for n, _, err in rows if err]
    if bad:
        raise ValueError(f"{path}: record {bad[0][0]}: {bad[0][1]} ({len(bad)} bad in all)")
    return [r for _, r, _ in rows]


def join_to_cache(records: list[dict[str, Any]], data_path: str, cache_sources: dict[str, str]) -> list[str]:
    """image_id of each record; ValueError naming the first records whose image is not cached."""
    ids, missing = [], []
    known = set(cache_sources.values())
    root = data_path.rsplit("/", 1)[0] if "/" in data_path else "."
    for r in records:
        try:
            source = resolve_image(r, root)
        except KeyError:
            source = None
        image_id = r.get("image_id") if r.get("image_id") in known else cache_sources.get(source)
        if image_id is None:
            missing.append(str(r.get("id", r.get("image"))))
        ids.append(image_id)
    if missing:
        raise ValueError(f"{len(missing)} record(s) have no cached features (first: {missing[:3]}); "
                         f"run `crosslayer features` on their images first")
    return ids


class Answerer:
    """Actor: the fused model and the cache rows, loaded once; answers a batch of questions greedily."""

    def __init__(self, job: EvalJob):
        import torch

        from cli_module.adapter import load_model
        from pipelines.feature_cache import CacheLookup

        torch.set_num_threads(1)
        self.job = job
        self.model, _ = load_model(job.adapter, job.base)
        self.cache = CacheLookup(job.features, self.model.base, self.model.vision_layers, self.model.config.pool)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cli_module.prompting import render, to_messages

        tok = self.model.base.tokenizer
        prompts = []
        for conv in batch["conversations"]:
            first_user = next(m for m in to_messages(json.loads(conv)) if m["role"] == "user")
            prompts.append(render(tok, [first_user], add_generation_prompt=True))
        feats = self.cache.features(list(batch["image_id"]))
        with torch.no_grad():
            inputs, visual = self.model.prepare_inputs(prompts, features=feats)
            tokens, _ = self.model.generate(**inputs, visual=visual, max_new_tokens=self.job.max_new_tokens,
                                            eos_token_id=tok.eos_token_id)
        preds = [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]
        return {"index": batch["index"], "prediction": np.array(preds, dtype=object)}


def run_eval(job: EvalJob) -> dict[str, Any]:
    import ray

    from cli_module.adapter import load_model
    from pipelines.feature_cache import check_serves, load_cache_table

    records = load_records(job.data)
    model, _ = load_model(job.adapter, job.base, weights=False)  # checks adapter and cache; no weights in memory
    check_serves(job.features, model.base, model.vision_layers, model.config.pool)
    method = model.config.method
    del model
    table = load_cache_table(job.features).select(["image_id", "source"])
    sources = dict(zip(table["source"].to_pylist(), table["image_id"].to_pylist()))
    ids = join_to_cache(records, job.data, sources)
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    items = [{"index": i, "image_id": ids[i], "conversations": json.dumps(r["conversations"])}
             for i, r in enumerate(records)]
    ds = ray.data.from_items(items).map_batches(
        Answerer, batch_size=job.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.concurrency), fn_constructor_kwargs={"job": job})
    predictions = {int(r["index"]): str(r["prediction"]) for r in ds.take_all()}
    scored = [{"id": r.get("id"), "type": r.get("type"), "answer": answer_of(r), "prediction": predictions[i]}
              for i, r in enumerate(records)]
    report = {**score(scored), "data": job.data, "features": job.features,
              "model": job.adapter or f"base:{job.base}",
              "method": method}
    if job.out:
        storage.write_json(job.out, report)
        body = "".join(json.dumps(s) + "\n" for s in scored).encode()
        storage.write_atomic(job.out.removesuffix(".json") + ".predictions.jsonl", body)
    return report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="short-answer accuracy on LLaVA-format JSONL, overall and per question type")
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--base", help="base to load; alone, evaluates the base VLM as is (one_to_one)")
    p.add_argument("--data", required=True, help="LLaVA-format JSONL with short answers")
    p.add_argument("--features", required=True, help="feature cache holding the images")
    p.add_argument("--out", help="report JSON path (predictions are written beside it)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    job = EvalJob(data=args.data, features=args.features, adapter=args.adapter, base=args.base, out=args.out,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, concurrency=args.concurrency)
    report = run_eval(job)  # SourceError / ValueError become one line and exit 2 in cli.main
    per_type = ", ".join(f"{k} {v:.3f}" for k, v in sorted(report["per_type"].items()))
    print(f"eval: accuracy {report['accuracy']:.3f} on {report['n']} records ({per_type})")
    print(json.dumps({k: report[k] for k in ("accuracy", "n", "per_type")}))
    return 0

