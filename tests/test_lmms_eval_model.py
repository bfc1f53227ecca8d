"""`lmms-eval --model crosslayer` on a local task (a task YAML over a local JSON file, no hub): the same greedy
answers as `crosslayer eval`, and the same log-likelihoods as its likelihood scorer (``jobs.eval_choice``), with
lmms-eval's sign (a loss: lower is better)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_files import png, write_jsonl
from conftest import perturb

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make install` (the [lmms] extra + --no-deps)")

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("What colour is it?", "red"), ("Which colour?", "blue"), ("Name the colour.", "red"),
             ("Is it red or blue?", "blue")]
UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return ["red", "blue"]


def doc_to_target(doc):
    return ["red", "blue"].index(doc["answer"])


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
'''
TASK = '''task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}
metadata:
  version: 0.0
'''
GENERATE = '''doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true'''
CHOICE = '''doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true'''


def plugin_site(folder: Path) -> Path:
    """What `pip install -e .` records for this checkout's entry points: a dist-info holding pyproject's
    ``lmms_eval.models`` entry points (the shared venv's crosslayer install is another checkout's)."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    info = folder / "crosslayer_lmms_test-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crosslayer-lmms-test\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return folder


def test_lmms_eval_matches_crosslayer_eval(ray_local, tmp_path):
    from cli_module.adapter import save_adapter
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from jobs.evaluate import EvalJob, run_eval

    adapter = tmp_path / "adapter"
    model = FusedVLM(load_base("tiny"), CLIConfig(vision_layers=[0, 2], inject_layers=[0, 1], attn_dim=16, heads=4,
                                                  lora_rank=4))
    perturb(model, std=1.0)
    save_adapter(model, adapter)
    images = tmp_path / "images"
    images.mkdir()
    docs = []
    for i, (q, a) in enumerate(QUESTIONS):
        (images / f"{i}.png").write_bytes(png(i))
        docs.append({"id": i, "image": str(images / f"{i}.png"), "question": q, "answer": a})
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    for name, output_type, extra in (("cl_gen", "generate_until", GENERATE), ("cl_choice", "multiple_choice", CHOICE)):
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, docs=tmp_path / "docs.json",
                                                        output_type=output_type, extra=extra))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site(tmp_path / "site")), str(ROOT)]),
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "crosslayer", "--model_args",
                          f"adapter={adapter},dtype=float32", "--tasks", "cl_gen,cl_choice", "--include_path",
                          str(tasks), "--batch_size", "2", "--device", "cpu", "--output_path", str(tmp_path / "out"),
                          "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "Error during evaluation" not in log, log[-4000:]  # lmms-eval exits 0 on errors
    samples = {}
    for path in (tmp_path / "out").rglob("*samples_*.jsonl"):
        task = "cl_gen" if "cl_gen" in path.name else "cl_choice"
        samples[task] = sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert set(samples) == {"cl_gen", "cl_choice"} and len(samples["cl_gen"]) == len(QUESTIONS)

    # the same questions through `crosslayer eval`: LLaVA question JSONL + references, generation and likelihood
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"question_id": d["id"], "image": d["image"], "text": d["question"],
                                                "category": "colour"} for d in docs])
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": d["id"], "answer": d["answer"]} for d in docs])
    report = run_eval(EvalJob(data=str(qfile), answers=str(refs), adapter=str(adapter), scoring="both",
                              max_new_tokens=4, stop=["\n\n"], out=str(tmp_path / "eval.json")))
    gen = [json.loads(x) for x in Path(report["answers_files"]["generate"]).read_text().splitlines()]
    choice = [json.loads(x) for x in Path(report["answers_files"]["choice"]).read_text().splitlines()]
    got = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
           for s in samples["cl_gen"]]
    assert [g.strip() for g in got] == [r["text"] for r in gen]
    assert any(r["text"] for r in gen)  # the model says something: the comparison is not of empty strings
    for s, r in zip(samples["cl_choice"], choice):
        losses = [float(resp[0]) for resp in s["filtered_resps"]]  # per choice: (loss, is_greedy), logged as text
        logprobs = r["metadata"]["logprobs"]
        assert losses == pytest.approx([-logprobs["red"], -logprobs["blue"]], abs=1e-4)
        assert ["red", "blue"][losses.index(min(losses))] == r["metadata"]["choice"]  # argmin == our argmax


def test_model_args_are_checked(tmp_path):
    from cli_module.adapter import save_adapter
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from jobs.lmms_eval_model import CrossLayer, parse_zero_gates

    save_adapter(FusedVLM(load_base("tiny"), CLIConfig(vision_layers=[0, 2], inject_layers=[0, 1], attn_dim=16,
                                                       heads=4, lora_rank=4)), tmp_path / "a")
    lmm = CrossLayer(adapter=str(tmp_path / "a"), zero_gates="2", device="cpu")  # the ablation switch, by layer
    assert [agf.zeroed for agf in lmm.model.agf] == [(1,), (1,)] and lmm.model_id == "a"
    assert [agf.zeroed for agf in CrossLayer(adapter=str(tmp_path / "a"), zero_gates="all").model.agf] == [(0, 1)] * 2

    assert parse_zero_gates("4+8", [2, 4, 8]) == [4, 8] and parse_zero_gates("all", [2, 4]) == [2, 4]
    assert parse_zero_gates(4, [4]) == [4] and parse_zero_gates("", [4]) == []
    with pytest.raises(ValueError, match="zero_gates='a,b'"):
        parse_zero_gates("a,b", [1])
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        CrossLayer(base="tiny", pretrained="x")
    with pytest.raises(ValueError, match="dtype='int4'"):
        CrossLayer(base="tiny", dtype="int4")
    with pytest.raises(ValueError, match="zero_gates needs a CLI adapter"):
        CrossLayer(base="tiny", zero_gates="all", device="cpu")
    with pytest.raises(ValueError, match=r"generation_kwargs \['image_aspect_ratio'\]"):
        CrossLayer._sampling({"image_aspect_ratio": "pad"}, dict)
    with pytest.raises(ValueError, match="num_beams > 1"):
        CrossLayer._sampling({"num_beams": 3}, dict)
