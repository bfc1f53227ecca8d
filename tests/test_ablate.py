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
from jobs.ablate import by_category, claim_folder, format_ablation, per_question, variants
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
    for scoring in ("generate", "choice"):  # per question type: the variant's own eval report, and its pairing
        for r in report["ablation"][scoring]:
            cats = r["by_category"]
            assert set(cats) == set(runs[r["variant"]]["by_scoring"][scoring]["per_type"]) and len(cats) > 1
            assert sum(c["n"] for c in cats.values()) == n
            for t, c in cats.items():
                assert c["accuracy"] == pytest.approx(runs[r["variant"]]["by_scoring"][scoring]["per_type"][t])
                assert c["change"] == pytest.approx(c["accuracy"] - report["ablation"][scoring][0]["by_category"][t]["accuracy"])
    assert "change vs full adapter per question type" in printed and report["resumed"] == []

    # interrupted after zero_0: the finished variants are read back, the rest run; the report is the same
    (tmp_path / "ablate.ablate" / "zero_2.json").unlink()
    (tmp_path / "ablate.ablate" / "zero_all.json").unlink()
    before = (tmp_path / "ablate.ablate" / "full.json").stat().st_mtime_ns
    assert main(["eval", "--adapter", str(adapter), *common, "--out", str(out), "--ablate"]) == 0
    assert "full, zero_0 read back from an earlier run" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["resumed"] == ["full", "zero_0"] and (tmp_path / "ablate.ablate" / "full.json").stat().st_mtime_ns == before
    assert again["ablation"] == report["ablation"] and again["gates"] == report["gates"]
    # the same folder with other settings is refused, and nothing in it is touched
    assert main(["eval", "--adapter", str(adapter), *common[:-2], "--max-new-tokens", "4", "--out", str(out),
                 "--ablate"]) == 2
    assert "holds an ablation of another evaluation (it differs in: max_new_tokens)" in capsys.readouterr().err
    perturb(model, std=1.0)  # retrained in place: the same path, other weights
    save_adapter(model, adapter)
    assert main(["eval", "--adapter", str(adapter), *common, "--out", str(out), "--ablate"]) == 2
    assert "(it differs in: adapter_sha256)" in capsys.readouterr().err
    assert json.loads(out.read_text()) == again


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
    cli = tmp_path / "cli"
    save_adapter(FusedVLM(load_base("tiny"), CLIConfig(**CLI)), cli)
    (cli / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="cli: no adapter_model.safetensors"):
        run_ablation(EvalJob(data=str(q), adapter=str(cli), out=str(tmp_path / "a.json"), answers=str(q)))
    assert not (tmp_path / "a.ablate").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"zero_gates=\['1'\]: give vision layer indices"):
        EvalJob(data=str(q), base="tiny", zero_gates=["1"])


def test_by_category_pairs_within_each_question_type():
    cats = ["a", "a", "a", "b", "b", None]
    full = np.array([0, 0, 0, 1, 1, 1], float)
    zeroed = np.array([1, 1, 1, 0, 1, 0], float)
    out = by_category(cats, zeroed, full, n_boot=200)
    assert list(out) == ["a", "b"] and out["a"]["n"] == 3 and out["b"]["n"] == 2  # the untyped question left out
    assert out["a"]["accuracy"] == 1.0 and out["a"]["change"] == 1.0
    assert out["b"]["change"] == pytest.approx(-0.5) and out["b"]["low"] <= -0.5 <= out["b"]["high"]
    assert out["a"]["low"] == 1.0  # every question of type a gains, so every resample does


def test_claim_folder_records_the_settings_and_refuses_another_evaluations_folder(tmp_path):
    from jobs.evaluate import EvalJob

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "text": "hi", "answer": "x"}) + "\n")
    job = EvalJob(data=str(q), adapter="a", out=str(tmp_path / "x.json"), scoring="choice")
    folder = str(tmp_path / "x.ablate")
    claim_folder(folder, job, ["full"], "d1")
    saved = json.loads((tmp_path / "x.ablate" / "job.json").read_text())
    assert saved["scoring"] == "choice" and saved["adapter_sha256"] == "d1" and "out" not in saved
    assert "batch_size" not in saved
    claim_folder(folder, EvalJob(data=str(q), adapter="a", out="elsewhere.json", scoring="choice", batch_size=4),
                 ["full"], "d1")  # another report path or batch size: the same answers, accepted
    with pytest.raises(ValueError, match=r"another evaluation \(it differs in: dtype, scoring\)"):
        claim_folder(folder, EvalJob(data=str(q), adapter="a", scoring="both", dtype="bfloat16"), ["full"], "d1")
    with pytest.raises(ValueError, match=r"it differs in: adapter_sha256"):  # the adapter retrained in place
        claim_folder(folder, job, ["full"], "d2")
    (tmp_path / "y.ablate").mkdir()
    (tmp_path / "y.ablate" / "full.json").write_text("{}")
    with pytest.raises(ValueError, match="holds variant reports but no job.json"):
        claim_folder(str(tmp_path / "y.ablate"), job, ["full"], "d1")
    assert not (tmp_path / "y.ablate" / "job.json").exists()


def test_format_ablation_prints_the_per_type_table():
    cat = {"a": {"n": 3, "accuracy": 0.5, "change": 0.0, "low": 0.0, "high": 0.0},
           "b": {"n": 2, "accuracy": 1.0, "change": 0.0, "low": 0.0, "high": 0.0}}
    rows = [{"variant": "full", "zero_gates": [], "accuracy": 0.7, "change": 0.0, "low": 0.0, "high": 0.0,
             "verdict": "-", "n": 5, "by_category": cat},
            {"variant": "zero_3", "zero_gates": [3], "accuracy": 0.6, "change": -0.1, "low": -0.2, "high": 0.0,
             "verdict": "no difference found", "n": 5,
             "by_category": {**cat, "a": {**cat["a"], "change": -0.25, "low": -0.5, "high": 0.125}}}]
    text = format_ablation({"benchmark": "exact", "ablation": {"choice": rows}, "gates": None})
    assert "| type | n | full adapter | vision layer 3 |" in text
    assert "| a | 3 | 0.500 | -0.250 [-0.500, +0.125] |" in text
