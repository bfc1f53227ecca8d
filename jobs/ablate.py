"""`crosslayer eval --ablate`: which vision layers does a CLI adapter use?

The same evaluation (any question file, references and scoring `crosslayer eval` reads) is run once with the
adapter as trained, once per vision layer k with AGF's gates of k forced to 0 at every injection layer
(``FusedVLM.zero_gates``), and once with every gate at 0, which is exactly the model without AGF: one-to-one on
the adapter's own input path. For each variant: its accuracy and its change against the full adapter on the same
questions, with a paired 95% bootstrap interval over questions (``jobs.intervals.paired_difference``). A layer
whose zeroing lowers accuracy with an interval below 0 is one the adapter uses; an interval holding 0 means no
difference found. The full run also reports the mean gate per (injection layer, vision layer) over the
questions' prompts.

  report (--out): {"ablation": {scoring: [{variant, zero_gates, accuracy, change, low, high, verdict}]},
                   "gates": {inject_layers, vision_layers, mean (|T| x K)}, "runs": {variant: report path}}
  each variant's eval report and answers file beside it: <out stem>.ablate/<variant>.json (+ .answers.jsonl)
"""

from __future__ import annotations

import json
from dataclasses import replace
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


def run_ablation(job: EvalJob, n_boot: int = 10_000) -> dict[str, Any]:
    """Run every variant of ``job`` (see the module docstring) and write the ablation report to ``job.out``."""
    from cli_module.adapter import load_model

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
    scores: dict[str, dict[str, np.ndarray]] = {s: {} for s in job.scorings}
    runs, gates = {}, None
    for name, zeroed in variants(layers):
        path = storage.join(folder, f"{name}.json")
        report = run_eval(replace(job, zero_gates=zeroed, record_gates=name == "full", out=path, answers_file=None))
        runs[name] = path
        gates = report.get("gates", gates)
        for scoring in job.scorings:
            rows = [json.loads(x) for x in storage.read_bytes(report["answers_files"][scoring]).decode().splitlines()]
            scores[scoring][name] = per_question(bench.kind, bench.items, [r["text"] for r in rows])
    table = {}
    for scoring, by in scores.items():
        full, table[scoring] = by["full"], []
        for name, zeroed in variants(layers):
            diff = paired_difference(by[name], full, n_boot=n_boot)
            table[scoring].append({"variant": name, "zero_gates": zeroed, "accuracy": float(by[name].mean()),
                                   "change": diff.estimate, "low": diff.low, "high": diff.high,
                                   "verdict": "-" if name == "full" else verdict(diff), "n": int(len(full))})
    out = {"benchmark": bench.kind, "data": job.data, "adapter": job.adapter, "vision_layers": layers,
           "ablation": table, "gates": gates, "runs": runs}
    storage.write_json(job.out, out)
    return out


def format_ablation(report: dict[str, Any]) -> str:
    """Markdown tables: each variant's accuracy and paired change vs the full adapter; the mean gates."""
    lines = []
    for scoring, rows in report["ablation"].items():
        lines += [f"{report['benchmark']}, {scoring}, {rows[0]['n']} questions:", "",
                  "| AGF gates zeroed | accuracy | change vs full adapter [95% CI] | verdict |", "|---|---|---|---|"]
        for r in rows:
            label = {"full": "none (full adapter)", "zero_all": "all (= one-to-one)"}.get(
                r["variant"], f"vision layer {r['zero_gates'][0]}" if r["zero_gates"] else r["variant"])
            change = "-" if r["variant"] == "full" else f"{r['change']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
            lines.append(f"| {label} | {r['accuracy']:.3f} | {change} | {r['verdict']} |")
        lines.append("")
    g = report.get("gates")
    if g and g.get("mean"):
        lines += [f"mean AGF gate over {g['questions']} prompts (rows: decoder layer, columns: vision layer):", "",
                  "| decoder layer | " + " | ".join(f"vision {k}" for k in g["vision_layers"]) + " |",
                  "|---|" + "---|" * len(g["vision_layers"])]
        for t, row in zip(g["inject_layers"], g["mean"]):
            lines.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
