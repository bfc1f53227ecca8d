"""`crosslayer eval --ablate`: which vision layers does a CLI adapter use?

The same evaluation (any question file, references and scoring `crosslayer eval` reads) is run once with the
adapter as trained, once per vision layer k with AGF's gates of k forced to 0 at every injection layer
(``FusedVLM.zero_gates``), and once with every gate at 0, which is exactly the model without AGF: one-to-one on
the adapter's own input path. For each variant: its accuracy and its change against the full adapter on the same
questions, with a paired 95% bootstrap interval over questions (``jobs.intervals.paired_difference``). A layer
whose zeroing lowers accuracy with an interval below 0 is one the adapter uses; an interval holding 0 means no
difference found. The same comparison is made within each question type (the record's ``type``, the benchmark's
category), which is where a layer that helps only fine-detail questions shows. The full run also reports the
mean gate per (injection layer, vision layer) over the questions' prompts.

An interrupted ablation resumes: a variant whose report is already in the folder is read back, not run again,
provided the folder's ``job.json`` (the evaluation settings it was started with, and the SHA-256 of the adapter's
weights, so an adapter retrained in place does not count as the same) matches this run's; a folder holding another
evaluation's variants is refused rather than overwritten.

  report (--out): {"ablation": {scoring: [{variant, zero_gates, accuracy, change, low, high, verdict, n,
                                           by_category: {type: {n, accuracy, change, low, high}}}]},
                   "gates": {inject_layers, vision_layers, mean (|T| x K)}, "runs": {variant: report path},
                   "resumed": [variants read back]}
  beside it, <out stem>.ablate/: job.json, and each variant's eval report and answers file (<variant>.json,
  <variant>.answers.jsonl)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from pipelines import storage

from .benchmarks import read_benchmark, score_items
from .evaluate import EvalJob, run_eval
from .intervals import paired_difference, verdict


def variants(vision_layers: list[int]) -> list[tuple[str, list[int]]]:
    """(name, vision layers zeroed): the full adapter, each layer alone, then all of them."""
    return [("full", []), *((f"zero_{k}", [k]) for k in vision_layers), ("zero_all", list(vision_layers))]


def per_question(kind: str, items: list, texts: list[str]) -> np.ndarray:
    """Each question's score (0/1, or VQA's partial credit) under the benchmark's own metric -> (questions,)."""
    return np.array([float(score_items(kind, [it], [t])["accuracy"]) for it, t in zip(items, texts)])


# settings that change no answer: a resumed ablation may run on another cluster shape
_LAYOUT_ONLY = ("out", "answers_file", "zero_gates", "record_gates", "batch_size", "concurrency", "gpus_per_actor")


def settings(job: EvalJob) -> dict[str, Any]:
    """What the variants' answers depend on: the evaluation job less its outputs and cluster layout."""
    return {k: v for k, v in asdict(job).items() if k not in _LAYOUT_ONLY}


def claim_folder(folder: str, job: EvalJob, names: list[str], weights_sha256: str) -> None:
    """Record ``job``'s settings and the adapter weights' digest in the ablation folder, or check them against the
    ones already there."""
    path = storage.join(folder, "job.json")
    mine = json.loads(json.dumps({**settings(job), "adapter_sha256": weights_sha256}))  # tuples as lists
    if storage.exists(path):
        theirs = storage.read_json(path)
        if theirs != mine:
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(f"{folder} holds an ablation of another evaluation (it differs in: {', '.join(diff)}); "
                             f"give another --out, or delete that folder to start over")
        return
    if any(storage.exists(storage.join(folder, f"{n}.json")) for n in names):
        raise ValueError(f"{folder} holds variant reports but no job.json saying how they were made; give another "
                         f"--out, or delete that folder to start over")
    storage.write_json(path, mine)


def by_category(categories: list[str | None], scores: np.ndarray, full: np.ndarray,
                n_boot: int) -> dict[str, dict[str, float]]:
    """Each question type's accuracy and paired change against the full adapter -> {type: {n, accuracy, change,
    low, high}}; questions without a type are left out (they count in the overall row)."""
    out = {}
    for cat in sorted({c for c in categories if c is not None}):
        mask = np.array([c == cat for c in categories])
        diff = paired_difference(scores[mask], full[mask], n_boot=n_boot)
        out[cat] = {"n": int(mask.sum()), "accuracy": float(scores[mask].mean()), "change": diff.estimate,
                    "low": diff.low, "high": diff.high}
    return out


def run_ablation(job: EvalJob, n_boot: int = 10_000) -> dict[str, Any]:
    """Run every variant of ``job`` (see the module docstring) and write the ablation report to ``job.out``."""
    from cli_module.adapter import WEIGHTS, load_model

    if job.adapter is None or job.out is None:
        raise ValueError("--ablate needs --adapter (a CLI adapter) and --out (the ablation report; each "
                         "variant's report goes beside it)")
    if job.zero_gates or job.record_gates:
        raise ValueError("--ablate chooses the gates to zero itself; drop --zero-gates")
    model, _ = load_model(job.adapter, job.base, weights=False)
    if model.config.method != "cli":
        raise ValueError(f"--ablate zeroes AGF's gates: {job.adapter} is a {model.config.method!r} adapter, which "
                         f"has none; give a CLI adapter")
    layers = list(model.vision_layers)
    del model
    bench = read_benchmark(job.data, job.answers, job.image_root, job.benchmark)
    if bench.kind == "unscored":
        raise ValueError("--ablate compares accuracies: give --answers (the references) for these questions")
    folder = job.out.removesuffix(".json") + ".ablate"
    digest = hashlib.sha256(storage.read_bytes(storage.join(job.adapter, WEIGHTS))).hexdigest()  # load_model checked it
    claim_folder(folder, job, [name for name, _ in variants(layers)], digest)
    scores: dict[str, dict[str, np.ndarray]] = {s: {} for s in job.scorings}
    runs, gates, resumed = {}, None, []
    for name, zeroed in variants(layers):
        path = storage.join(folder, f"{name}.json")
        if storage.exists(path):  # written last, atomically: the variant finished
            report = storage.read_json(path)
            resumed.append(name)
        else:
            report = run_eval(replace(job, zero_gates=zeroed, record_gates=name == "full", out=path,
                                      answers_file=None))
        runs[name] = path
        gates = report.get("gates", gates)
        for scoring in job.scorings:
            rows = [json.loads(x) for x in storage.read_bytes(report["answers_files"][scoring]).decode().splitlines()]
            if [r["question_id"] for r in rows] != [it.question_id for it in bench.items]:
                raise ValueError(f"{report['answers_files'][scoring]} answers other questions than {job.data} "
                                 f"asks (was the question file changed?); delete {folder} to start over")
            scores[scoring][name] = per_question(bench.kind, bench.items, [r["text"] for r in rows])
    categories = [it.category for it in bench.items]
    table = {}
    for scoring, by in scores.items():
        full, table[scoring] = by["full"], []
        for name, zeroed in variants(layers):
            diff = paired_difference(by[name], full, n_boot=n_boot)
            table[scoring].append({"variant": name, "zero_gates": zeroed, "accuracy": float(by[name].mean()),
                                   "change": diff.estimate, "low": diff.low, "high": diff.high,
                                   "verdict": "-" if name == "full" else verdict(diff), "n": int(len(full)),
                                   "by_category": by_category(categories, by[name], full, n_boot)})
    out = {"benchmark": bench.kind, "data": job.data, "adapter": job.adapter, "vision_layers": layers,
           "ablation": table, "gates": gates, "runs": runs, "resumed": resumed}
    storage.write_json(job.out, out)
    return out


def _label(row: dict[str, Any]) -> str:
    names = {"full": "none (full adapter)", "zero_all": "all (= one-to-one)"}
    return names.get(row["variant"], f"vision layer {row['zero_gates'][0]}" if row["zero_gates"] else row["variant"])


def _change(d: dict[str, float]) -> str:
    return f"{d['change']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def format_ablation(report: dict[str, Any]) -> str:
    """Markdown tables: each variant's accuracy and paired change vs the full adapter; the mean gates."""
    lines = []
    for scoring, rows in report["ablation"].items():
        lines += [f"{report['benchmark']}, {scoring}, {rows[0]['n']} questions:", "",
                  "| AGF gates zeroed | accuracy | change vs full adapter [95% CI] | verdict |", "|---|---|---|---|"]
        for r in rows:
            change = "-" if r["variant"] == "full" else _change(r)
            lines.append(f"| {_label(r)} | {r['accuracy']:.3f} | {change} | {r['verdict']} |")
        lines.append("")
        cats = list(rows[0].get("by_category", {}))
        if len(cats) > 1:
            zeroed = rows[1:]
            lines += [f"{scoring}: change vs full adapter per question type [95% CI]:", "",
                      "| type | n | full adapter | " + " | ".join(_label(r) for r in zeroed) + " |",
                      "|---|---|---|" + "---|" * len(zeroed)]
            for c in cats:
                full = rows[0]["by_category"][c]
                lines.append(f"| {c} | {full['n']} | {full['accuracy']:.3f} | "
                             + " | ".join(_change(r["by_category"][c]) for r in zeroed) + " |")
            lines.append("")
    g = report.get("gates")
    if g and g.get("mean"):
        lines += [f"mean AGF gate over {g['questions']} prompts (rows: decoder layer, columns: vision layer):", "",
                  "| decoder layer | " + " | ".join(f"vision {k}" for k in g["vision_layers"]) + " |",
                  "|---|" + "---|" * len(g["vision_layers"])]
        for t, row in zip(g["inject_layers"], g["mean"]):
            lines.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
