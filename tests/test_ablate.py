"""Gate ablation: the model-level switch (``FusedVLM.zero_gates``) and `crosslayer eval --ablate` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import perturb, random_images

from cli_module.adapter import save_adapter
from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from cli_module.prompting import chat_prompt
from jobs.ablate import per_question, variants
from jobs.benchmarks import EvalItem, score_items

CLI = dict(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4)


def _inputs(model, n=2):
    prompts = [chat_prompt(model.base.tokenizer, "what is this" + "?" * i) for i in range(n)]
    return model.prepare_inputs(prompts, images=random_images(n))


@pytest.mark.parametrize("gate", ["layer", "channel"])
def test_zeroing_every_gate_is_exactly_one_to_one_and_one_gate_is_a_closed_gate(tiny_base, gate):
    model = FusedVLM(tiny_base, CLIConfig(**CLI, gate=gate))
    perturb(model)
    (inputs, visual) = _inputs(model)
    full = model(**inputs, visual=visual, return_gates=True)
    plain = FusedVLM(tiny_base, CLIConfig(method="one_to_one"))(**inputs, visual=visual).logits
    assert (full.logits - plain).abs().max() > 1e-3  # the adapter really changes the answer
    model.zero_gates([0, 1, 2])
    assert torch.equal(model(**inputs, visual=visual).logits, plain)  # bit for bit
    # one layer zeroed == that layer's gate bias at -1e4 (sigmoid exactly 0), the others as trained
    model.zero_gates([1])
    one = model(**inputs, visual=visual, return_gates=True)
    assert (one.gates[..., 1] == 0).all()  # gates (B, S, |T|, K) as applied
    assert torch.equal(one.gates[:, :, 0, 0], full.gates[:, :, 0, 0])  # the first injection layer's others: as trained
    model.zero_gates()
    with torch.no_grad():
        for agf in model.agf:
            agf.gate_bias[1] = -1e4
    closed = model(**inputs, visual=visual).logits
    assert torch.allclose(one.logits, closed, atol=1e-5) and (one.logits - full.logits).abs().max() > 1e-4


def test_zero_gates_refuses_layers_the_adapter_lacks_and_adapters_without_gates(tiny_base):
    model = FusedVLM(tiny_base, CLIConfig(**CLI))
    with pytest.raises(ValueError, match=r"vision layer\(s\) \[5\] are not among this adapter's vision_layers"):
        model.zero_gates([5])
    with pytest.raises(ValueError, match="zero_gates needs a CLI adapter.*'deepstack'"):
        FusedVLM(tiny_base, CLIConfig(**{**CLI, "vision_layers": [0, 1]}, method="deepstack")).zero_gates([0])
    FusedVLM(tiny_base, CLIConfig(method="one_to_one")).zero_gates([])  # nothing to zero: allowed


@pytest.mark.parametrize("kind,reference,choices,texts", [
    ("vqav2", [["2"] * 3 + ["3"] * 7, ["red"] * 10, ["two"] * 10], None, ["2", "blue", "2"]),
    ("pope", ["yes", "no", "no"], None, ["Yes", "yes", "No."]),
    ("multiple_choice", ["A", "B", "C"], ["cat", "dog", "cow"], ["A", "dog", "B"]),
    ("exact", ["red", "two", "left"], None, ["red", "2", "right"]),
])
def test_per_question_scores_average_to_the_benchmark_metric(kind, reference, choices, texts):
    items = [EvalItem(question_id=i, messages=[], prompt="q", reference=r, choices=choices, category="c")
             for i, r in enumerate(reference)]
    scores = per_question(kind, items, texts)
    assert scores.mean() == pytest.approx(score_items(kind, items, texts)["accuracy"])
    assert len(set(scores.tolist())) > 1  # some right, some wrong: the pairing has something to pair


@pytest.mark.slow  # seven evaluations through Ray Data: ~1 min on a quiet 2-core machine
def test_eval_ablate_end_to_end(ray_local, tmp_path, capsys):
    """`crosslayer eval --ablate` on synthetic records over a feature cache, generation and likelihood: the
    all-zero variant answers exactly as one-to-one (texts and log-probabilities), the full variant as a plain
    eval, each change is the paired difference of the per-question scores, and the gate means are sigmoid
    values per (injection layer, vision layer)."""
    from jobs.cli import main

    data, cache, adapter = tmp_path / "synth", tmp_path / "cache", tmp_path / "adapter"
    model = FusedVLM(load_base("tiny"), CLIConfig(vision_layers=[0, 2], inject_layers=[0, 1], attn_dim=16,
                                                  heads=4, lora_rank=4))
    perturb(model, std=1.0)
    save_adapter(model, adapter)
    assert main(["data", "synth", "--out", str(data), "--n", "12", "--image-size", "32"]) == 0
    assert main(["features", str(data / "images"), "--out", str(cache), "--base", "tiny", "--layers", "0", "2"]) == 0
    common = ["--data", str(data / "train.jsonl"), "--features", str(cache), "--scoring", "both",
              "--max-new-tokens", "3"]
    out = tmp_path / "ablate.json"
    assert main(["eval", "--adapter", str(adapter), *common, "--out", str(out), "--ablate"]) == 0
    printed = capsys.readouterr().out
    assert "| all (= one-to-one) |" in printed and "| vision layer 2 |" in printed and "mean AGF gate" in printed
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["ablation"]["generate"]] == [v for v, _ in variants([0, 2])]
    assert main(["eval", "--base", "tiny", *common, "--out", str(tmp_path / "o2o.json")]) == 0
    assert main(["eval", "--adapter", str(adapter), *common, "--out", str(tmp_path / "full.json")]) == 0
    capsys.readouterr()

    def answers(path):
        return [json.loads(x) for x in open(path).read().splitlines()]

    runs = {name: json.loads(open(p).read()) for name, p in report["runs"].items()}
    n = len((data / "train.jsonl").read_text().splitlines())
    for scoring, suffix in (("generate", ".answers.jsonl"), ("choice", ".answers.choice.jsonl")):
        zero_all = answers(runs["zero_all"]["answers_files"][scoring])
        o2o = answers(tmp_path / f"o2o{suffix}")
        full = answers(runs["full"]["answers_files"][scoring])
        assert [r["text"] for r in zero_all] == [r["text"] for r in o2o]
        assert [r["text"] for r in full] == [r["text"] for r in answers(tmp_path / f"full{suffix}")]
        if scoring == "choice":
            assert [r["metadata"]["logprobs"] for r in zero_all] == [r["metadata"]["logprobs"] for r in o2o]
            assert [r["metadata"]["logprobs"] for r in full] != [r["metadata"]["logprobs"] for r in o2o]
        rows = {r["variant"]: r for r in report["ablation"][scoring]}
        for name in ("zero_0", "zero_2", "zero_all"):
            r = rows[name]
            assert r["change"] == pytest.approx(r["accuracy"] - rows["full"]["accuracy"])
            assert r["low"] - 1e-9 <= r["change"] <= r["high"] + 1e-9 and r["n"] == n
        assert rows["full"]["accuracy"] == pytest.approx(runs["full"]["by_scoring"][scoring]["accuracy"])
        assert rows["zero_all"]["accuracy"] == pytest.approx(json.loads(
            (tmp_path / "o2o.json").read_text())["by_scoring"][scoring]["accuracy"])
    gates = np.array(report["gates"]["mean"])
    assert gates.shape == (2, 2) and ((gates > 0) & (gates < 1)).all() and report["gates"]["questions"] == n
    assert runs["zero_2"]["zero_gates"] == [2] and "gates" not in runs["zero_2"]


def test_ablate_refuses_what_it_cannot_do(tmp_path):
    from jobs.ablate import run_ablation
    from jobs.evaluate import EvalJob

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "text": "hi", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="--ablate needs --adapter"):
        run_ablation(EvalJob(data=str(q), base="tiny", out=str(tmp_path / "a.json")))
    adapter = tmp_path / "o2o"
    save_adapter(FusedVLM(load_base("tiny"), CLIConfig(**{**CLI, "vision_layers": [0, 1]}, method="deepstack")),
                 adapter)
    with pytest.raises(ValueError, match="'deepstack' adapter, which has none"):
        run_ablation(EvalJob(data=str(q), adapter=str(adapter), out=str(tmp_path / "a.json")))
    with pytest.raises(ValueError, match=r"zero_gates=\['1'\]: give vision layer indices"):
        EvalJob(data=str(q), base="tiny", zero_gates=["1"])
