"""`crosslayer eval`: a fused model (or the base as is) on a standard benchmark or this project's records, scored
with the benchmark's own metric, its answers written in LLaVA's answers-file format.

  question file (+ references) ──jobs.benchmarks──> questions (every human turn), references, metric
        │  images: the feature cache (--features), or decoded from --image-root / the TSV by CPU tasks
        ▼
  answer actors (Ray Data actor pool; one per GPU in bfloat16 where the cluster has GPUs, else on CPU):
    generate: the answer, decoded with the KV cache (greedy by default; temperature, top_p, seed, stop)
    choice:   the candidate with the highest log-probability after the prompt (jobs.eval_choice)
        ▼
  report JSON (--out): the metric of each scoring run, overall and per type / category
  answers JSONL (--answers-file, or beside the report): {question_id, prompt, text, answer_id, model_id, metadata}
            in question-file order: what LLaVA's scripts, the official scorers and lmms-eval users read

Benchmarks and files: ``jobs.benchmarks``; metrics: ``jobs.scoring``; device, dtype, actors and batch size:
``pipelines.compute``; sampling: ``pipelines.generation``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from pipelines import storage
from pipelines.compute import (
    Compute,
    add_compute_arguments,
    cluster_resources,
    place_model,
    resolve_compute,
)
from pipelines.generation import (
    GenerationJob,
    add_sampling_arguments,
    complete,
    offline_engine,
    sampling_from_args,
)
from pipelines.images import DEFAULT_MAX_PIXELS, decode_image

from .benchmarks import KINDS, Benchmark, EvalItem, answer_rows, candidates, read_benchmark, score_items
from .scoring import LETTERS

BATCH_CPU, BATCH_GPU = 16, 64  # default questions per model call on each device
Scoring = Literal["generate", "choice", "both"]


@dataclass
class EvalJob(GenerationJob):
    """Arguments of `crosslayer eval`."""

    data: str  # question file: LLaVA's question JSONL, MMBench's TSV, or LLaVA conversations (local or s3://)
    features: str | None = None  # feature cache holding the images; None: images are decoded and encoded
    adapter: str | None = None  # adapter folder; None evaluates the base as is (one_to_one)
    base: str | None = None  # base to load (default: the adapter's)
    answers: str | None = None  # references: VQAv2 annotations, POPE label file(s), problems.json, answers JSONL
    image_root: str | None = None  # folder / s3:// prefix of the questions' relative image paths (default: data's)
    benchmark: str = "auto"  # the metric; auto: what the references call for (jobs.benchmarks.KINDS)
    scoring: Scoring = "generate"  # generate answers, score candidates by likelihood, or both
    out: str | None = None  # report path (JSON)
    answers_file: str | None = None  # LLaVA answers file; default: the report's name with .answers.jsonl
    max_new_tokens: int = 8  # short answers; raise it for open-ended benchmarks
    temperature: float = 0.0  # 0: greedy, as LLaVA's evaluation scripts run
    top_p: float = 1.0  # nucleus sampling mass
    seed: int | None = None  # sampling seed (per model call)
    stop: list[str] = field(default_factory=list)  # answers end before the first of these strings
    max_candidates: int = 64  # likelihood scoring: the largest answer set drawn from the data per question type
    batch_size: int = 0  # questions per model call; 0: 16 on cpu, 64 on cuda
    concurrency: int = 0  # answer actors; 0: one per GPU share on cuda, 1 on cpu
    device: str = "auto"  # auto: cuda when the Ray cluster has GPUs, else cpu
    dtype: str = "auto"  # model dtype; auto: bfloat16 on cuda, float32 on cpu
    gpus_per_actor: float = 1.0  # GPUs Ray reserves per answer actor on cuda
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap for decoded images
    zero_gates: list[int] = field(default_factory=list)  # ablation: AGF gates of these vision layers set to 0
    record_gates: bool = False  # report the mean AGF gate per (injection layer, vision layer) over the prompts

    def __post_init__(self) -> None:
        if self.adapter is None and self.base is None:
            raise ValueError("give --adapter DIR, or --base BASE to evaluate the base VLM as is")
        if self.benchmark not in ("auto", *KINDS):
            raise ValueError(f"benchmark={self.benchmark!r} is not one of {['auto', *KINDS]}")
        if self.scoring not in ("generate", "choice", "both"):
            raise ValueError(f"scoring={self.scoring!r} is not one of ['generate', 'choice', 'both']")
        if self.max_candidates < 2:
            raise ValueError(f"max_candidates ({self.max_candidates}) must be >= 2")
        if any(not isinstance(k, int) or isinstance(k, bool) for k in self.zero_gates):
            raise ValueError(f"zero_gates={self.zero_gates!r}: give vision layer indices (ints)")
        self.compute_spec()  # validates device, dtype, concurrency, batch size
        self.sampling()  # validates the sampling settings

    @property
    def scorings(self) -> list[str]:
        return ["generate", "choice"] if self.scoring == "both" else [self.scoring]



# --- images ----------------------------------------------------------------------------------------------------

def image_bytes(item: dict[str, Any]) -> bytes:
    """A question row's image: inline base64 (MMBench) or read from its path / URI."""
    if item["image_b64"]:
        return base64.b64decode(item["image_b64"])
    return storage.read_bytes(str(item["image"]))


def join_to_cache(items: list[EvalItem], cache_sources: dict[str, str], cache_ids: set[str]) -> list[str]:
    """The cache's image_id of each question with an image ("" for text questions): by the image's path (as the
    cache recorded its source), or by the content hash of an inline image; ValueError naming the uncached."""
    ids, missing = [], []
    sources = {storage.image_key(s): i for s, i in cache_sources.items()}
    for it in items:
        if it.image_b64:
            image_id = hashlib.sha256(base64.b64decode(it.image_b64)).hexdigest()[:32]
            ids.append(image_id if image_id in cache_ids else None)
        else:
            ids.append(sources.get(storage.image_key(it.image)) if it.image else "")
        if ids[-1] is None:
            missing.append(str(it.image or it.question_id))
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no cached features (first: {missing[:3]}); run "
                         f"`crosslayer features` on their images (--image-root as here), or drop --features")
    return ids  # type: ignore[return-value]


def check_images_exist(items: list[EvalItem]) -> None:
    """Local image files must exist before any model loads (s3:// images are checked as they are read)."""
    missing = sorted({it.image for it in items if it.image and not it.image.startswith("s3://")
                      and not os.path.isfile(it.image)})
    if missing:
        raise ValueError(f"{len(missing)} image file(s) not found (first: {missing[:3]}); relative paths are "
                         f"under --image-root (default: the question file's folder)")


def decode_images(batch: dict[str, np.ndarray], processor: Any, max_pixels: int) -> dict[str, np.ndarray]:
    """CPU task: decode and preprocess each question's image (whole-image crop, as every job feeds the model, or a
    Qwen base's patches + ``image_grid_thw``: ``pipelines.pixels``); text questions get zero pixels. An unreadable
    image stops the evaluation, naming the question."""
    from pipelines.pixels import preprocess

    images = []
    for k in range(len(batch["key"])):
        row = {c: batch[c][k] for c in ("image", "image_b64", "question_id")}
        if not (row["image"] or row["image_b64"]):
            images.append(None)
            continue
        try:
            images.append(decode_image(image_bytes(row), max_pixels))
        except Exception as exc:
            raise ValueError(f"question {row['question_id']}: cannot read its image {row['image'] or '(inline)'}: "
                             f"{type(exc).__name__}: {exc}") from exc
    return {**batch, **preprocess(processor, images)}


# --- the answer actors -----------------------------------------------------------------------------------------

class Answerer:
    """Actor: the fused model (and the cache rows), loaded once on the actor's device and dtype; per batch, the
    generated answers and / or the candidates' log-probabilities."""

    def __init__(self, job: EvalJob, compute: Compute):
        import torch

        from cli_module.adapter import load_model
        from pipelines.feature_cache import CacheLookup

        if compute.device == "cpu":
            torch.set_num_threads(max(1, int(compute.num_cpus)))
        self.job, self.sampling, self.max_rows = job, job.sampling(), max(compute.batch_size, 8)
        model, _ = load_model(job.adapter, job.base, dtype=compute.torch_dtype())
        self.model = place_model(model, compute)
        self.engine = offline_engine(self.model)  # one decoding engine for every batch of this actor
        self.model.zero_gates(job.zero_gates)  # ablation switch (jobs.ablate); () leaves the gates as trained
        weight = next(self.model.parameters())
        self.dtype, self.device = str(weight.dtype).removeprefix("torch."), weight.device.type
        self.cache = None
        if job.features:
            self.cache = CacheLookup(job.features, self.model.base, self.model.vision_layers,
                                     self.model.config.pool, deepstack=self.model.base_deepstack)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["key"])
        generated, tokens, chosen = [""] * n, [0] * n, [""] * n
        scores: list[list[float]] = [[] for _ in range(n)]
        gates = [""] * n  # record_gates: per question, the mean gate (|T|, K) over its prompt, as JSON
        with_image = [i for i in range(n) if batch["image"][i] or batch["image_b64"][i]]
        for group in (with_image, [i for i in range(n) if i not in with_image]):
            if not group:
                continue
            with torch.no_grad():
                feats = self._features(batch, group) if group is with_image else None
                if "generate" in self.job.scorings:
                    for i, done in zip(group, self._generate(batch, group, feats)):
                        generated[i], tokens[i] = done.text, done.tokens
                if "choice" in self.job.scorings:
                    for i, got in zip(group, self._choose(batch, group, feats)):
                        scores[i] = got
                        cands = json.loads(batch["candidates"][i])
                        chosen[i] = cands[int(np.argmax(got))]
                if self.job.record_gates and group is with_image:
                    for i, g in zip(group, self._gate_means(batch, group, feats)):
                        gates[i] = json.dumps(g)
        return {"key": batch["key"], "generated": np.array(generated, dtype=object),
                "completion_tokens": np.array(tokens), "chosen": np.array(chosen, dtype=object),
                "scores": np.array([json.dumps(s) for s in scores], dtype=object),
                "dtype": np.array([self.dtype] * n), "device": np.array([self.device] * n),
                "gates": np.array(gates, dtype=object)}

    def _features(self, batch: dict[str, np.ndarray], group: list[int]):

        if self.cache is not None:
            return self.cache.features([str(batch["image_id"][i]) for i in group])
        from pipelines.pixels import model_inputs

        pixels, grids = model_inputs(batch["pixels"][group], batch["image_grid_thw"][group])  # or Qwen's patches
        return self.model.encode_images(pixels, image_grid_thw=grids)

    def _prompts(self, batch: dict[str, np.ndarray], group: list[int], instruct: bool) -> list[list[dict]]:
        out = []
        for i in group:
            messages = json.loads(batch["messages"][i])
            if instruct and batch["instruction"][i]:
                messages[-1]["content"] += "\n" + str(batch["instruction"][i])
            out.append(messages)
        return out

    def _generate(self, batch, group, feats):
        from cli_module.prompting import render

        tok, family = self.model.base.tokenizer, self.model.base.kind
        prompts = [render(tok, m, add_generation_prompt=True, family=family)
                   for m in self._prompts(batch, group, instruct=True)]
        inputs, visual = self.model.prepare_inputs(prompts, features=feats)
        return complete(self.model, inputs, visual, self.sampling, self.engine)

    def _gate_means(self, batch, group, feats) -> list[list[list[float]]]:
        """Each question's AGF gates (|T|, K) averaged over its prompt's tokens (one forward, no decoding)."""
        from cli_module.prompting import render

        tok, family = self.model.base.tokenizer, self.model.base.kind
        prompts = [render(tok, m, add_generation_prompt=True, family=family)
                   for m in self._prompts(batch, group, instruct=True)]
        inputs, visual = self.model.prepare_inputs(prompts, features=feats)
        g = self.model(**inputs, visual=visual, return_gates=True, logits_to_keep=1).gates  # (B, S, |T|, K)
        if g is None:
            raise ValueError(f"record_gates needs a CLI adapter; method {self.model.config.method!r} has no gates")
        m = inputs["attention_mask"].to(g.dtype)[:, :, None, None]  # (B, S, 1, 1): real tokens only
        return ((g.float() * m).sum(1) / m.sum(1)).tolist()  # (B, |T|, K)

    def _choose(self, batch, group, feats):
        from cli_module.prompting import render

        from .eval_choice import continuation_ids, score_continuations

        tok, family = self.model.base.tokenizer, self.model.base.kind
        dialogues = self._prompts(batch, group, instruct=False)
        conts = [[continuation_ids(tok, m, c, family=family) for c in json.loads(batch["candidates"][i])]
                 for m, i in zip(dialogues, group)]
        prompts = [render(tok, m, add_generation_prompt=True, family=family) for m in dialogues]
        inputs, visual = self.model.prepare_inputs(prompts, features=feats)
        return score_continuations(self.model, inputs, visual, conts, max_rows=self.max_rows)


# --- the job ---------------------------------------------------------------------------------------------------

def run_eval(job: EvalJob) -> dict[str, Any]:
    """Ask every question, score with the benchmark's metric, write the report and the answers file(s)."""
    from cli_module.adapter import load_model
    from pipelines.feature_cache import check_serves, load_cache_table

    t0 = time.time()
    bench = read_benchmark(job.data, job.answers, job.image_root, job.benchmark)
    items = bench.items
    cands = candidates(bench.kind, items, job.max_candidates) if "choice" in job.scorings else [[]] * len(items)
    model, model_id = load_model(job.adapter, job.base, weights=False)  # checks adapter and cache; no weights
    method, processor = model.config.method, model.base.image_processor
    layout = {"inject_layers": list(model.config.inject_layers), "vision_layers": list(model.vision_layers)}
    if (job.zero_gates or job.record_gates) and method != "cli":
        raise ValueError(f"gate ablation and gate means need a CLI adapter; {job.adapter or job.base} is {method!r}")
    model.zero_gates(job.zero_gates)  # checks the layers before any actor starts
    image_ids = [""] * len(items)
    if job.features:
        check_serves(job.features, model.base, model.vision_layers, model.config.pool, model.base_deepstack)
        table = load_cache_table(job.features).select(["image_id", "source"])
        ids = table["image_id"].to_pylist()
        image_ids = join_to_cache(items, dict(zip(table["source"].to_pylist(), ids)), set(ids))
    else:
        check_images_exist(items)
    del model
    compute = resolve_compute(job.compute_spec(), cluster_resources(), BATCH_CPU, BATCH_GPU)
    results = {int(r["key"]): r for r in eval_dataset(job, compute, items, cands, image_ids, processor).take_all()}
    rows = [results[k] for k in range(len(items))]
    by_scoring, answers = {}, {}
    for scoring in job.scorings:
        texts, meta = _answers_of(scoring, bench, rows, cands)
        by_scoring[scoring] = score_items(bench.kind, items, texts)
        answers[scoring] = answer_rows(items, texts, model_id, meta)
    primary = job.scorings[0]
    report = {"benchmark": bench.kind, "layout": bench.layout, "scoring": primary, **by_scoring[primary],
              "by_scoring": by_scoring, "data": job.data, "answers": job.answers, "features": job.features,
              "model": job.adapter or f"base:{job.base}", "model_id": model_id, "method": method,
              "sampling": asdict(job.sampling()), "compute": compute.describe(),
              "dtypes_used": sorted({str(r["dtype"]) for r in rows}),
              "devices_used": sorted({str(r["device"]) for r in rows}), "notes": bench.notes,
              "seconds": round(time.time() - t0, 2)}
    if job.zero_gates:
        report["zero_gates"] = list(job.zero_gates)
    if job.record_gates:
        per_q = [json.loads(str(r["gates"])) for r in rows if r["gates"]]
        report["gates"] = {**layout, "questions": len(per_q),
                           "mean": np.mean(per_q, axis=0).round(4).tolist() if per_q else None}  # (|T|, K)
    report["answers_files"] = write_outputs(job, report, answers)
    return report


def eval_dataset(job: EvalJob, compute: Compute, items: list[EvalItem], cands: list[list[str]],
                 image_ids: list[str], processor: Any):
    """The (lazy) Ray Dataset of the job: image decode tasks on CPUs (unless the cache has the features), then
    the answer actor pool with ``compute``'s resources (its ``map_batches`` gets ``compute.map_kwargs()``)."""
    import ray

    rows = [{"key": k, "question_id": str(it.question_id), "messages": json.dumps(it.messages),
             "instruction": it.instruction or "", "image": it.image or "", "image_b64": it.image_b64 or "",
             "image_id": image_ids[k], "candidates": json.dumps(cands[k])} for k, it in enumerate(items)]
    ds = ray.data.from_items(rows)
    if not job.features and any(it.image or it.image_b64 for it in items):
        from pipelines.pixels import for_job

        processor, cap = for_job(processor, job.max_pixels)  # a Qwen base resizes to --max-pixels, not refuses
        ds = ds.map_batches(decode_images, batch_size=compute.batch_size, batch_format="numpy", num_cpus=0.5,
                            fn_kwargs={"processor": processor, "max_pixels": cap})
    return ds.map_batches(Answerer, batch_format="numpy", **compute.map_kwargs(),
                          fn_constructor_kwargs={"job": job, "compute": compute})


def _answers_of(scoring: str, bench: Benchmark, rows: list[dict], cands: list[list[str]]):
    """The answer text of each question under ``scoring``, and the metadata its answers-file row carries."""
    texts, meta = [], []
    for it, row, cs in zip(bench.items, rows, cands):
        m: dict[str, Any] = {"reference": it.reference} if it.reference is not None else {}
        if scoring == "generate":
            texts.append(str(row["generated"]))
            m["completion_tokens"] = int(row["completion_tokens"])
        else:
            best = str(row["chosen"])
            letter = LETTERS[cs.index(best)] if it.choices else None
            texts.append(letter or best)
            m.update({"choice": best, "logprobs": dict(zip(cs, json.loads(row["scores"])))})
        meta.append(m)
    return texts, meta


def write_outputs(job: EvalJob, report: dict[str, Any], answers: dict[str, list[dict]]) -> dict[str, str]:
    """The report (``job.out``) and one answers file per scoring run: ``answers_file`` (default: beside the
    report) for the first, the same name with ``.choice.jsonl`` for likelihood answers under ``both``."""
    path = job.answers_file or (job.out.removesuffix(".json") + ".answers.jsonl" if job.out else None)
    written = {}
    if path:
        for k, (scoring, rows) in enumerate(answers.items()):
            target = path if k == 0 else path.removesuffix(".jsonl") + f".{scoring}.jsonl"
            storage.write_atomic(target, "".join(json.dumps(r) + "\n" for r in rows).encode())
            written[scoring] = target
    if job.out:
        storage.write_json(job.out, {**report, "answers_files": written})
    return written


# --- command line ----------------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate on a standard benchmark (VQAv2, POPE, MMBench, ScienceQA) or "
                                    "LLaVA-format records, with each benchmark's metric")
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--base", help="base to load; alone, evaluates the base VLM as is (one_to_one)")
    p.add_argument("--data", "--question-file", dest="data", required=True,
                   help="questions: LLaVA's question JSONL, MMBench's TSV, or LLaVA conversations (JSON/JSONL)")
    p.add_argument("--answers", help="references: VQAv2 annotations JSON, a POPE label file or folder, ScienceQA's "
                                     "problems.json, or JSONL {question_id, answer(s)}")
    p.add_argument("--image-root", help="folder or s3:// prefix of the questions' image paths "
                                        "(default: the question file's folder)")
    p.add_argument("--benchmark", choices=["auto", *(k for k in KINDS if k != "unscored")], default="auto",
                   help="the metric, checked against the references (auto: what the references call for)")
    p.add_argument("--scoring", choices=["generate", "choice", "both"], default="generate",
                   help="generate answers, or pick the candidate answer with the highest likelihood, or both")
    p.add_argument("--max-candidates", type=int, default=64,
                   help="--scoring choice without options: the largest answer set per question type")
    p.add_argument("--features", help="feature cache holding the images (default: decode and encode them)")
    p.add_argument("--out", help="report JSON path (the answers file goes beside it)")
    p.add_argument("--answers-file", help="LLaVA-format answers JSONL (default: beside --out)")
    add_sampling_arguments(p, max_new_tokens=8)
    add_compute_arguments(p, BATCH_CPU, BATCH_GPU)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--zero-gates", type=int, nargs="+", default=[], metavar="K",
                   help="CLI adapters: set AGF's gates of these vision layers to 0 (an ablation)")
    p.add_argument("--ablate", action="store_true",
                   help="CLI adapters: evaluate with each vision layer's gates zeroed in turn, and all of them; "
                        "report each accuracy change vs the full adapter with a paired 95%% interval, and the "
                        "mean gates (needs --out and references)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    job = EvalJob(data=args.data, features=args.features, adapter=args.adapter, base=args.base, answers=args.answers,
                  image_root=args.image_root, benchmark=args.benchmark, scoring=args.scoring, out=args.out,
                  answers_file=args.answers_file, max_new_tokens=sampling.max_new_tokens,
                  temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, stop=sampling.stop,
                  max_candidates=args.max_candidates, batch_size=args.batch_size, concurrency=args.concurrency,
                  device=args.device, dtype=args.compute_dtype, gpus_per_actor=args.gpus_per_actor,
                  max_pixels=args.max_pixels, zero_gates=args.zero_gates)
    if args.ablate:
        from .ablate import format_ablation, run_ablation

        report = run_ablation(job)
        print(format_ablation(report))
        if report["resumed"]:
            print(f"eval --ablate: {', '.join(report['resumed'])} read back from an earlier run of this ablation")
        print(f"eval --ablate: report {job.out}")
        return 0
    report = run_eval(job)  # SourceError / ValueError become one line and exit 2 in cli.main
    c = report["compute"]
    for scoring, m in report["by_scoring"].items():
        if m.get("scored") is False:
            print(f"eval ({scoring}): {m['n']} answers written, no references to score them "
                  f"({report['answers_files'].get(scoring, 'give --out or --answers-file to keep them')})")
            continue
        extra = "".join(f", {k} {m[k]:.3f}" for k in ("precision", "recall", "f1", "yes_ratio") if k in m)
        per_type = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m["per_type"].items()))
        print(f"eval ({report['benchmark']}, {scoring}): accuracy {m['accuracy']:.3f}{extra} on {m['n']} "
              f"questions" + (f" ({per_type})" if per_type else ""))
    print(f"eval: {c['concurrency']} actor(s) on {c['device']} in {c['dtype']}" + (f" ({c['notes']})" if c["notes"] else ""))
    print(json.dumps({k: report[k] for k in ("benchmark", "scoring", "by_scoring", "answers_files")}))
    return 0
