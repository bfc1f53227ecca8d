"""The benchmark that matters: CLI versus its baselines on the `small` base (DINOv2-S + SmolLM2-135M).

Same synthetic data, same seeds. Stage 1 trains the projector once (projector_ft); every method then starts
from that stage-1 projector: `one_to_one` is the stage-1 model as is, and each other method trains its own
parameters for the same number of stage-2 steps on top of it (projector_ft trains P further; deepstack,
input_fusion, AMP only (several layers, gate fixed at 1), AGF only (one vision layer, no low-rank adapter)
and full CLI). Reports mean and spread over seeds, overall and per question type, and trainable parameters.

    .venv/bin/python bench/quality.py --n 1000 --stage1-steps 150 --stage2-steps 60 --seeds 0 1
    .venv/bin/python bench/quality.py ... --ablations --ablation-seeds 0   # then the design-choice ablations
    .venv/bin/python bench/quality.py ... --stage2-steps 120 --methods cli amp_only --seeds 0 --suffix=-long120 \
        --results bench/quality-long-results.json                        # another stage-2 budget, same stage 1

`--ablations` also runs the paper's ablations of CLI, one design choice changed at a time (injection layers,
positions, gate granularity, LoRA rank, vision layers, pooling), and tabulates them against full CLI.
Writes bench/quality-results.json and prints a Markdown table (copy it into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a script (python bench/NAME.py): the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, INJECT = [3, 6, 9, 12], [2, 10, 18, 26]
METHODS: dict[str, list[str]] = {  # stage-2 overrides per method (all on top of the stage-1 projector)
    "cli": ["method=cli"],
    "projector_ft": ["method=projector_ft"],
    "agf_only": ["method=cli", "cli.vision_layers=[12]", "cli.lora_rank=0"],
    "amp_only": ["method=cli", "cli.gate=none"],
    "deepstack": ["method=deepstack", "cli.pool=1"],
    "input_fusion": ["method=input_fusion", "cli.pool=1"],
}
ABLATIONS: dict[str, tuple[str, list[str]]] = {  # name: (what changes from full CLI, overrides)
    "abl-inject-dense": ("injection at 10 decoder layers (0, 3, ..., 27)",
                         ["method=cli", f"cli.inject_layers={json.dumps(list(range(0, 30, 3)))}"]),
    "abl-inject-late": ("injection at 2 late decoder layers (22, 26)", ["method=cli", "cli.inject_layers=[22,26]"]),
    "abl-positions-text": ("AGF updates text positions only", ["method=cli", "cli.positions=text"]),
    "abl-positions-image": ("AGF updates image positions only", ["method=cli", "cli.positions=image"]),
    "abl-gate-channel": ("gate per channel instead of per vision layer", ["method=cli", "cli.gate=channel"]),
    "abl-gate-open": ("gates start 0.88 open (gate_init 2) instead of 0.5", ["method=cli", "cli.gate_init=2.0"]),
    "abl-rank-0": ("no low-rank adapter (rank 0: V_k through P only)", ["method=cli", "cli.lora_rank=0"]),
    "abl-rank-64": ("LoRA rank 64", ["method=cli", "cli.lora_rank=64", "cli.lora_alpha=128"]),
    "abl-layers-2": ("2 vision layers (6, 12) instead of 4", ["method=cli", "cli.vision_layers=[6,12]"]),
    "abl-pool-1": ("no pooling (64 visual tokens per layer instead of 16)", ["method=cli", "cli.pool=1"]),
}


def train(work: Path, name: str, steps: int, lr: float, seed: int, cache: str, extra: list[str]) -> dict:
    """One training run; a finished one (summary.json on disk) is reused, so an interrupted benchmark resumes."""
    from jobs.train import run_train
    from jobs.train_config import load_config, recipe_overrides

    done = work / name / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [*recipe_overrides(base="small", output_dir=work / name, data_dir=work / "data",
                                   features=work / cache, steps=steps, lr=lr, micro_batch=4, vision_layers=LAYERS,
                                   inject_layers=INJECT, pool=2, attn_dim=256, seed=seed, log_every=20),
                 "trainer.max_failures=2", "cli.lora_rank=16", "cli.lora_alpha=32", "deepspeed.precision=bf16", *extra]
    return run_train(load_config(None, overrides))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--work", default="out/quality")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="the stage-2 methods to run (default: all)")
    ap.add_argument("--ablations", action="store_true", help="also run the CLI ablations (one change each)")
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--results", default="bench/quality-results.json", help="where the JSON summary goes")
    ap.add_argument("--suffix", default="", help="appended to stage-2 run folders (e.g. -long: another budget, "
                                                 "same data, caches and stage 1)")
    ap.add_argument("--report-only", action="store_true",
                    help="tabulate the eval.json files already in --work (e.g. of an interrupted run)")
    args = ap.parse_args()
    if args.report_only:
        return report_only(Path(args.work).resolve(), args)

    import ray

    from jobs.evaluate import EvalJob, run_eval
    from pipelines.features import FeatureJob, run_features
    from pipelines.synth import SynthConfig, synthesize

    t0, work = time.time(), Path(args.work).resolve()
    synthesize(SynthConfig(out=str(work / "data"), n=args.n, seed=0, image_size=args.image_size))
    test = (work / "data" / "test.jsonl").read_text().splitlines()[: args.eval_n]
    (work / "data" / "test-sub.jsonl").write_text("\n".join(test) + "\n")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    for cache, pool in (("cache-pool2", 2), ("cache-pool1", 1)):
        run_features(FeatureJob(src=str(work / "data" / "images"), out=str(work / cache), base="small",
                                vision_layers=LAYERS, pool=pool, batch_size=16, threads=2))
    stage1 = train(work, "stage1", args.stage1_steps, args.stage1_lr, 0, "cache-pool2", ["method=projector_ft"])
    print(f"[quality] stage 1 done: loss {stage1['loss']} ({time.time() - t0:.0f} s)", flush=True)

    def evaluate(adapter: str, cache: str) -> dict:
        done = Path(adapter).parent / "eval.json"
        if done.is_file():
            return json.loads(done.read_text())
        return run_eval(EvalJob(data=str(work / "data" / "test-sub.jsonl"), features=str(work / cache),
                                adapter=adapter, out=str(Path(adapter).parent / "eval.json")))

    results: dict[str, list[dict]] = {"one_to_one": [with_val(evaluate(stage1["adapter"], "cache-pool2"), stage1)]}
    params = {"one_to_one": 0}
    runs = [(m, extra, args.seeds) for m, extra in METHODS.items() if m in args.methods]
    if args.ablations:
        runs += [(name, extra, args.ablation_seeds) for name, (_, extra) in ABLATIONS.items()]
    for method, extra, seeds in runs:  # every seed of a method before the next method
        for seed in seeds:
            cache = "cache-pool1" if "cli.pool=1" in extra else "cache-pool2"
            run = train(work, f"{method}-seed{seed}{args.suffix}", args.stage2_steps, args.stage2_lr, seed, cache,
                        [*extra, f"init_projector={stage1['adapter']}"])
            report = with_val(evaluate(run["adapter"], cache), run)
            results.setdefault(method, []).append(report)
            params[method] = run["params"]["trainable_params"]
            print(f"[quality] {method} seed {seed}: accuracy {report['accuracy']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    ray.shutdown()

    write_table(results, params, args, t0, stage1["loss"])


def report_only(work: Path, args: argparse.Namespace) -> None:
    """Rebuild the table from eval.json and summary.json files on disk."""
    results: dict[str, list[dict]] = {}
    params: dict[str, int] = {}
    s1 = json.loads((work / "stage1" / "summary.json").read_text())
    results["one_to_one"] = [with_val(json.loads((work / "stage1" / "eval.json").read_text()), s1)]
    params["one_to_one"] = 0
    for method in [*METHODS, *ABLATIONS]:
        for run in sorted(work.glob(f"{method}-seed*")):
            if re.fullmatch(rf"{re.escape(method)}-seed\d+{re.escape(args.suffix)}", run.name) and \
                    (run / "eval.json").is_file():
                summary = json.loads((run / "summary.json").read_text())
                results.setdefault(method, []).append(with_val(json.loads((run / "eval.json").read_text()), summary))
                params[method] = summary["params"]["trainable_params"]
    write_table(results, params, args, time.time(), s1["loss"])


def with_val(report: dict, summary: dict) -> dict:
    """The test report plus the run's teacher-forced validation figures (100 questions, less noisy than greedy
    exact match): answer-token loss and accuracy."""
    return {**report, "val_loss": summary["eval_loss"], "val_token_acc": summary["eval_token_acc"]}


def write_table(results: dict[str, list[dict]], params: dict[str, int], args: argparse.Namespace, t0: float,
                stage1_loss: float) -> None:
    types = sorted({t for rs in results.values() for r in rs for t in r["per_type"]})
    header = ["| method | trainable params | accuracy (mean ± spread) | val loss | val token acc | "
              + " | ".join(types) + " |", "|---|---|---|---|---|" + "---|" * len(types)]
    main_lines, ablation_lines = list(header), list(header)
    summary = {}
    for method, reports in results.items():
        acc = [r["accuracy"] for r in reports]
        mean, spread = statistics.mean(acc), (max(acc) - min(acc)) / 2
        per_type = {t: statistics.mean(r["per_type"].get(t, 0.0) for r in reports) for t in types}
        val_loss = statistics.mean(r["val_loss"] for r in reports)
        val_acc = statistics.mean(r["val_token_acc"] for r in reports)
        summary[method] = {"accuracy": acc, "mean": mean, "spread": spread, "per_type": per_type,
                           "val_loss": val_loss, "val_token_acc": val_acc, "trainable_params": params[method]}
        label = f"{method}: {ABLATIONS[method][0]}" if method in ABLATIONS else method
        row = (f"| {label} | {params[method]:,} | {mean:.3f} ± {spread:.3f} (n={len(acc)}) | {val_loss:.3f} | "
               f"{val_acc:.3f} | "
               + " | ".join(f"{per_type[t]:.2f}" for t in types) + " |")
        (ablation_lines if method in ABLATIONS else main_lines).append(row)
        if method == "cli":
            ablation_lines.append(row.replace("| cli |", "| full CLI (reference) |"))
    table = "\n".join(main_lines)
    ablations = "\n".join(ablation_lines) if len(ablation_lines) > len(header) + 1 else ""
    out = {"args": vars(args), "seconds": round(time.time() - t0), "stage1_loss": stage1_loss,
           "methods": summary, "table": table, "ablation_table": ablations}
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    print(table)
    if ablations:
        print("\n" + ablations)
    print(f"[quality] {round(time.time() - t0)} s in all")

if __name__ == "__main__":
    main()
