"""``crosslayer quickstart``: the project's main job end to end on an embedded base, in one process.

Local Ray, local files, the real pretrained ``small`` base (or ``tiny``): synthesise a VQA set, cache its
multi-layer features (Ray Data), train stage 1 (the projector) and stage 2 (CLI) with Ray Train + DeepSpeed,
evaluate CLI against one-to-one (the stage-1 model as is), caption a few images (Ray Data), serve the adapter
(Ray Serve) and answer one OpenAI-style request with its gates, and write a report folder: ``results.md``,
``loss.png``, ``gates.png``, ``captions.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Preset:
    """Sizes of one quickstart run; `small` is sized for about 15 minutes on 2 CPU cores."""

    base: str  # base preset
    n: int  # synthetic images (one question each)
    image_size: int  # synthetic image side in pixels
    vision_layers: list[int]  # vision hidden_states indices K
    pool: int  # AMP token pooling
    inject_layers: list[int]  # decoder layers T
    attn_dim: int  # AGF width
    stage1_steps: int  # projector steps
    stage2_steps: int  # CLI steps
    stage1_lr: float  # projector learning rate
    stage2_lr: float  # CLI learning rate
    micro_batch: int  # sequences per worker per step
    eval_n: int  # test records evaluated
    captions: int  # images captioned
    precision: str = "fp32"  # DeepSpeed precision of both stages (bf16: frozen base in bf16, fp32 master weights)


PRESETS = {
    "tiny": Preset(base="tiny", n=96, image_size=32, vision_layers=[1, 2], pool=2, inject_layers=[0, 1], attn_dim=16,
                   stage1_steps=10, stage2_steps=10, stage1_lr=3e-3, stage2_lr=3e-3, micro_batch=8, eval_n=16,
                   captions=4),
    "small": Preset(base="small", n=640, image_size=112, vision_layers=[3, 6, 9, 12], pool=2, inject_layers=[2, 10, 18, 26],
                    attn_dim=256, stage1_steps=60, stage2_steps=60, stage1_lr=1e-3, stage2_lr=5e-4, micro_batch=4,
                    eval_n=64, captions=6, precision="bf16"),
}


def say(step: int, total: int, text: str) -> None:
    print(f"[quickstart {step}/{total}] {text}", flush=True)


def train_stage(p: Preset, work: Path, name: str, method: str, steps: int, lr: float,
                init_projector: str | None = None) -> dict[str, Any]:
    from jobs.train import run_train
    from jobs.train_config import load_config, recipe_overrides

    overrides = [*recipe_overrides(base=p.base, output_dir=work / name, data_dir=work / "data",
                                   features=work / "cache", steps=steps, lr=lr, micro_batch=p.micro_batch,
                                   vision_layers=p.vision_layers, inject_layers=p.inject_layers, pool=p.pool,
                                   attn_dim=p.attn_dim),
                 f"method={method}", "deepspeed.zero_stage=2", f"deepspeed.precision={p.precision}"]
    if init_projector:
        overrides.append(f"init_projector={init_projector}")
    return run_train(load_config(None, overrides))


def serve_one_request(adapter: str, base: str, image: bytes, question: str) -> dict[str, Any]:
    """Start Ray Serve with the adapter, ask one question through the official openai client, shut down."""
    from openai import OpenAI
    from ray import serve

    from pipelines.serve import app_builder

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"base": base, "adapters": [adapter]}), name="quickstart", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        model = client.models.list().data[0].id
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        reply = client.chat.completions.create(
            model=model, max_tokens=8, temperature=0, extra_body={"return_gates": True},
            messages=[{"role": "user", "content": [{"type": "text", "text": question},
                                                   {"type": "image_url", "image_url": {"url": url}}]}])
        return reply.model_dump()
    finally:
        serve.shutdown()


def run_quickstart(preset: str, out: Path) -> int:
    import numpy as np
    import ray

    from jobs.caption import CaptionJob, read_captions, run_caption
    from jobs.evaluate import EvalJob, run_eval
    from pipelines.features import FeatureJob, run_features
    from pipelines.gates import draw_gates
    from pipelines.synth import SynthConfig, synthesize

    p, total, t0 = PRESETS[preset], 8, time.time()
    out = out.resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        return time.time()

    say(1, total, f"synthesising {p.n} images with questions at {p.image_size} px ...")
    synthesize(SynthConfig(out=str(work / "data"), n=p.n, seed=0, image_size=p.image_size))
    test = [json.loads(x) for x in (work / "data" / "test.jsonl").read_text().splitlines()][: p.eval_n]
    (work / "data" / "test-sub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    t = lap("synth", t0)
    own_ray = not ray.is_initialized()
    if own_ray:
        # with its dashboard: Ray Train's PlacementGroupCleaner asks the State API (served by the dashboard) once
        # a second whether the run's controller lives; without it every query fails (a log line each), and a query
        # that returns no state is taken as "dead" and removes the run's placement group, killing the run
        ray.init(num_cpus=2, include_dashboard=True, configure_logging=False)  # workers print progress
    say(2, total, f"caching layers {p.vision_layers} (+ the input layer) of the {p.base!r} encoder with Ray Data ...")
    cache = run_features(FeatureJob(src=str(work / "data" / "images"), out=str(work / "cache"), base=p.base,
                                    vision_layers=p.vision_layers, pool=p.pool, batch_size=16, concurrency=1, threads=2))
    t = lap("features", t)
    say(3, total, f"stage 1: training the projector for {p.stage1_steps} steps (Ray Train + DeepSpeed, 2 workers) ...")
    s1 = train_stage(p, work, "stage1", "projector_ft", p.stage1_steps, p.stage1_lr)
    t = lap("stage1", t)
    say(4, total, f"stage 2: training CLI (AMP + AGF) for {p.stage2_steps} steps on the stage-1 projector ...")
    s2 = train_stage(p, work, "stage2", "cli", p.stage2_steps, p.stage2_lr, init_projector=s1["adapter"])
    t = lap("stage2", t)
    say(5, total, f"evaluating CLI and one-to-one on {len(test)} held-out questions ...")
    reports = {}
    for label, adapter in (("one-to-one (stage-1 model)", s1["adapter"]), ("CLI (stage 2)", s2["adapter"])):
        reports[label] = run_eval(EvalJob(data=str(work / "data" / "test-sub.jsonl"), features=str(work / "cache"),
                                          adapter=adapter, out=str(work / f"eval-{adapter.split('/')[-2]}.json")))
    t = lap("eval", t)
    say(6, total, f"captioning {p.captions} images with Ray Data ...")
    few = work / "caption-src"
    few.mkdir()
    for img in sorted((work / "data" / "images").iterdir())[: p.captions]:
        shutil.copy(img, few / img.name)
    run_caption(CaptionJob(src=str(few), out=str(work / "captions"), adapter=s2["adapter"], features=str(work / "cache"),
                           max_new_tokens=24, batch_size=p.captions))
    captions = sorted(read_captions(str(work / "captions")), key=lambda r: r["source"])
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    t = lap("caption", t)
    say(7, total, "serving the CLI adapter with Ray Serve and asking one OpenAI-style question ...")
    question = test[0]["conversations"][0]["value"].replace("<image>", "").strip()
    image_bytes = (work / "data" / test[0]["image"]).read_bytes()
    reply = serve_one_request(s2["adapter"], p.base, image_bytes, question)
    gates = reply["gates"]
    draw_gates(np.asarray(gates["values"]), out / "gates.png", gates["inject_layers"], gates["vision_layers"],
               tokens=gates.get("tokens"))
    t = lap("serve", t)
    if own_ray:
        ray.shutdown()
    say(8, total, "writing the report ...")
    shutil.copy(Path(s2["adapter"]).parent / "loss.png", out / "loss.png")
    shutil.copy(Path(s1["adapter"]).parent / "loss.png", out / "loss-stage1.png")
    answer = reply["choices"][0]["message"]["content"]
    write_results(out, p, reports, s1, s2, cache, question, test[0]["answer"], answer, timings, t0)
    print(f"report: {out}/results.md ({round(time.time() - t0)} s)")
    return 0


def write_results(out: Path, p: Preset, reports: dict, s1: dict, s2: dict, cache: dict, question: str,
                  truth: str, answer: str, timings: dict, t0: float) -> None:
    types = sorted({t for r in reports.values() for t in r["per_type"]})
    lines = [f"# Quickstart results ({p.base} base)", "",
             f"Held-out questions: {next(iter(reports.values()))['n']}; stage 1 {p.stage1_steps} steps, "
             f"stage 2 {p.stage2_steps} steps; {round(time.time() - t0)} s in all on this machine.", "",
             "| model | accuracy | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
    for label, r in reports.items():
        lines.append(f"| {label} | {r['accuracy']:.3f} | " + " | ".join(f"{r['per_type'].get(t, 0):.2f}" for t in types) + " |")
    lines += ["", f"Served request: *{question}* → **{answer!r}** (reference: {truth!r}); gates in `gates.png`.",
              "", f"Training: stage 1 final loss {_round(s1.get('loss'))}, stage 2 final loss {_round(s2.get('loss'))} "
              f"(eval loss {_round(s2.get('eval_loss'))}); curve in `loss.png`. Captions in `captions.jsonl`.", "",
              "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in timings.items()), ""]
    (out / "results.md").write_text("\n".join(lines))
    summary = {"preset": asdict(p), "reports": reports, "stage1": s1, "stage2": s2, "features": cache,
               "served": {"question": question, "answer": answer, "reference": truth}, "timings_s": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _round(value: float | None) -> str:
    """A loss as the tables print numbers: three decimals (``-`` when the run reported none)."""
    return "-" if value is None else f"{value:.3f}"
