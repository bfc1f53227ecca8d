"""The quality benchmark's data plumbing (bench/quality_powered.py): the caption conversations hold only training
images, the instruct mix holds every training question and caption exactly once, in a seeded order, each
stage-2 run is paired with the one-to-one answers of the base it stood on (a retrained base is not identical), and
the export writes the compact record of the runs (no answers files, no adapters) from which the pooled intervals
come out again."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench import quality_powered
from bench.quality_powered import (
    BASE_ANSWERS,
    base_choice,
    caption_conversations,
    instruct_mix,
    keep_base_answers,
    multi_turn_questions,
)
from jobs.intervals import accuracy_interval, paired_difference
from pipelines.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(out=out, n=40, seed=0, image_size=32, val_frac=0.2, test_frac=0.2))
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_caption_conversations_hold_training_images_only(synth: Path) -> None:
    conv = [json.loads(x) for x in lines(caption_conversations(synth))]
    train = {json.loads(x)["image"] for x in lines(synth / "train.jsonl")}
    held_out = {json.loads(x)["image"] for f in ("val.jsonl", "test.jsonl") for x in lines(synth / f)}
    assert {r["image"] for r in conv} == train and not held_out & train
    captions = {json.loads(x)["image"]: json.loads(x)["caption"] for x in lines(synth / "captions.jsonl")}
    for r in conv:  # a LLaVA-Pretrain-style turn: the image, then its own caption as the reply
        assert r["conversations"][0]["value"].startswith("<image>")
        assert r["conversations"][1]["value"] == captions[r["image"]]


def test_instruct_mix_holds_every_question_and_caption_once(synth: Path) -> None:
    captions = caption_conversations(synth)
    first = lines(instruct_mix(synth, captions))
    want = lines(synth / "train.jsonl") + lines(captions)
    assert sorted(first) == sorted(want)  # nothing lost, nothing doubled
    assert first != want  # shuffled: questions and captions interleave
    kinds = ["type" in json.loads(x) for x in first[: len(first) // 2]]
    assert any(kinds) and not all(kinds)
    assert lines(instruct_mix(synth, captions)) == first  # the same order every time (seed 0)


def write_answers(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": i, "text": t, "extra": "cut"}) + "\n"
                            for i, t in enumerate(texts)))


def test_each_run_pairs_with_the_base_it_stood_on(tmp_path: Path) -> None:
    records = [{"answer": a} for a in ("red", "2", "left")]
    first, second = tmp_path / "first" / "eval.answers.choice.jsonl", tmp_path / "second" / "eval.answers.choice.jsonl"
    write_answers(first, ["Red", "3", "left"])  # an earlier training of the base: 2 of 3 right
    write_answers(second, ["blue", "2", "right"])  # the base trained again: 1 of 3
    old, new, bare = tmp_path / "cli-seed0", tmp_path / "cli-seed1", tmp_path / "cli-seed2"
    for run in (old, new, bare):
        run.mkdir()
    keep_base_answers(old, {"answers_files": {"choice": str(first)}})
    # a moved --work: the answers file is found beside eval.json
    keep_base_answers(new, {"answers_files": {"choice": "/gone/eval.answers.choice.jsonl"},
                            "eval_json": str(second.parent / "eval.json")})
    current = np.array([0.0, 0.0, 0.0])
    got = base_choice([old, new, bare], records, current)
    assert [a.tolist() for a in got] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]  # the last has no copy: this work's base
    with pytest.raises(ValueError, match="2 answers for 3 questions"):
        write_answers(old / BASE_ANSWERS, ["red", "2"])
        base_choice([old], records, current)



def finished_run(work: Path, name: str, texts: dict[str, list[str]], eval_loss: float,
                 base: list[str] | None = None) -> None:
    """A run folder as the benchmark leaves it: summary, validation curve, eval report and its answers files
    (recorded under the paths of another machine, found beside eval.json), and optionally its base's answers."""
    run = work / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 4, "eval_loss": eval_loss,
                                                  "params": {"trainable_params": 7}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": eval_loss + 1}) + "\n"
                                       + json.dumps({"step": 4, "loss": 0.5}) + "\n"
                                       + json.dumps({"step": 4, "eval_loss": eval_loss}) + "\n")
    files = {}
    for scoring, answers in texts.items():
        path = run / ("eval.answers.jsonl" if scoring == "generate" else "eval.answers.choice.jsonl")
        write_answers(path, answers)
        files[scoring] = f"/elsewhere/{name}/{path.name}"
    (run / "eval.json").write_text(json.dumps({"answers_files": files}))
    if base is not None:
        write_answers(run / BASE_ANSWERS, base)


def test_export_writes_the_compact_record_the_pooled_figures_come_from(tmp_path: Path) -> None:
    work = tmp_path / "work"
    answers = ["red", "blue", "2", "3", "red", "3"]
    types = ["color", "color", "count", "count", "color", "count"]
    records = [{"question_id": i, "type": t, "answer": a} for i, (t, a) in enumerate(zip(types, answers))]
    (work / "data").mkdir(parents=True)
    (work / "data" / "test-sub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["red", "red", "2", "2", "red", "2"]  # this work's one-to-one: 1 0 1 0 1 0
    older = ["blue", "blue", "3", "3", "blue", "3"]  # another training of the base: 0 1 0 1 0 1
    finished_run(work, "stage1-captions", {}, 1.5)  # trained, not scored
    finished_run(work, "stage1-instruct-mix", {"choice": base}, 0.6)
    finished_run(work, "cli-seed0", {"choice": answers, "generate": ["red", "x", "2", "x", "x", "x"]}, 0.58,
                 base=older)
    finished_run(work, "cli-seed1", {"choice": ["red", "blue", "x", "x", "x", "x"]}, 0.57)  # stood on this base
    finished_run(work, "amp_only-seed0", {"choice": ["red", "blue", "2", "x", "x", "x"]}, 0.59, base=base)
    dest = tmp_path / "results.json"
    dest.write_text(json.dumps({"tables": {"methods": "| kept |"}, "runs": {"stale": {}}}))

    assert quality_powered.export(work, dest, "python bench/quality_powered.py --export results.json") == 0
    out = json.loads(dest.read_text())
    assert out["tables"] == {"methods": "| kept |"}  # the results file is extended, its tables kept
    assert list(out["runs"]) == ["stage1-captions", "stage1-instruct-mix", "amp_only-seed0", "cli-seed0",
                                 "cli-seed1"]  # stale runs replaced; stage 1 first, in its order
    assert out["questions"] == 6 and out["questions_per_type"] == {"color": 3, "count": 3}
    assert out["provenance"]["command"].endswith("--export results.json")
    assert re.fullmatch(r"[0-9a-f]{40}", out["provenance"]["commit"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "work"]  # no answers, no adapters

    captions, cli0, cli1, amp = (out["runs"][n] for n in ("stage1-captions", "cli-seed0", "cli-seed1",
                                                          "amp_only-seed0"))
    assert captions["val_loss"] == 1.5 and captions["correct"] == {} and "choice" not in captions
    assert (cli0["method"], cli0["seed"], cli0["steps"], cli0["val_loss"]) == ("cli", 0, 4, 0.58)
    assert cli0["val_curve"] == {"0": 1.58, "4": 0.58}
    assert cli0["correct"] == {"choice": "111111", "generate": "101000"}
    assert cli0["choice"]["estimate"] == 1.0 and cli0["generate"]["estimate"] == pytest.approx(2 / 6)
    assert cli0["per_type"]["generate"] == {"color": pytest.approx(1 / 3), "count": pytest.approx(1 / 3)}
    assert "choice" in cli1 and "generate" not in cli1
    # each run paired with the base it stood on: cli-seed0 with its kept (older) base, cli-seed1 with this work's
    assert out["one_to_one"] == "stage1-instruct-mix"
    assert out["bases"]["stage1-instruct-mix"] == "101010"
    other = "another training of stage1-instruct-mix (first kept beside cli-seed0)"
    assert out["bases"][other] == "010101"
    assert (cli0["base"], cli1["base"], amp["base"]) == (other, "stage1-instruct-mix", "stage1-instruct-mix")
    assert cli0["minus_one_to_one"]["estimate"] == pytest.approx(1 - 3 / 6)
    assert cli1["minus_one_to_one"]["estimate"] == pytest.approx(2 / 6 - 3 / 6)
    assert amp["minus_cli"]["estimate"] == pytest.approx(3 / 6 - 1) and "minus_cli" not in cli0
    lo, hi = amp["minus_cli"]["low"], amp["minus_cli"]["high"]
    assert lo <= amp["minus_cli"]["estimate"] <= hi and amp["minus_cli"]["level"] == 0.95

    # the pooled figures (seeds pooled, each run with its base) come out of the record alone
    runs = [quality_powered.unbits(out["runs"][n]["correct"]["choice"]) for n in ("cli-seed0", "cli-seed1")]
    stood = [quality_powered.unbits(out["bases"][out["runs"][n]["base"]]) for n in ("cli-seed0", "cli-seed1")]
    assert vars(accuracy_interval(np.stack(runs))) == vars(accuracy_interval(np.array([[1.0] * 6, [1, 1, 0, 0, 0, 0]])))
    assert paired_difference(np.stack(runs), np.stack(stood)).estimate == pytest.approx((1 + 2 / 6 - 3 / 6 - 3 / 6) / 2)


def test_export_names_what_it_misses(tmp_path: Path) -> None:
    (tmp_path / "cli-seed0").mkdir()
    with pytest.raises(FileNotFoundError, match="test-sub.jsonl is missing"):
        quality_powered.export(tmp_path, tmp_path / "out.json", "python")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test-sub.jsonl").write_text(json.dumps({"question_id": 0, "type": "color",
                                                                  "answer": "red"}) + "\n")
    with pytest.raises(ValueError, match="no finished run"):
        quality_powered.export(tmp_path, tmp_path / "out.json", "python")
    assert not (tmp_path / "out.json").exists()


def test_group_table_pairs_each_run_with_its_base_and_states_the_goals() -> None:
    """Control and headroom types are scored apart: CLI's gain on the headroom types against one-to-one (each run
    with its base) and against the best control, and its change on the control types, with the goals' verdicts."""
    types = ["arrow"] * 40 + ["color"] * 40  # arrow: a headroom type; colour: a control type
    records = [{"type": t} for t in types]
    one = np.r_[np.zeros(40), np.ones(40)]  # the base: no arrow right, every colour right
    cli = np.r_[np.ones(30), np.zeros(10), np.ones(40)]  # +0.75 on arrow, colour kept
    lora = np.r_[np.ones(20), np.zeros(20), np.ones(38), np.zeros(2)]  # +0.5 on arrow, -0.05 on colour
    scores = {"one_to_one": {"choice": [one]}, "cli": {"choice": [cli, cli]}, "llm_lora": {"choice": [lora]}}
    bases = {"cli": [one, one], "llm_lora": [one]}
    groups = quality_powered.type_groups(["arrow", "color"])
    assert groups == {"control": {"color"}, "headroom": {"arrow"}}
    rows, out = quality_powered.group_table(scores, bases, records, groups)
    assert out["cli"]["headroom"]["minus_one_to_one"]["estimate"] == pytest.approx(0.75)
    assert out["llm_lora"]["control"]["minus_one_to_one"]["estimate"] == pytest.approx(-0.05)
    assert out["llm_lora"]["headroom"]["cli_minus"]["estimate"] == pytest.approx(0.25)
    text = "\n".join(rows)
    assert "headroom types: CLI - one-to-one +0.750" in text and ">= +0.080 with the interval above 0: met" in text
    assert "the best control (llm_lora) +0.250" in text
    assert "control types: CLI - one-to-one +0.000" in text and ">= -0.010: met" in text
    assert quality_powered.type_groups(["color", "shape"]) == {"control": {"color", "shape"}}


def test_llm_lora_control_matches_clis_parameters_and_instruct_continued_trains_at_the_bases_last_rates() -> None:
    rank, counts = quality_powered.matched_lora_rank("tiny")
    assert abs(counts["llm_lora"] / counts["cli"] - 1) <= 0.10 and rank >= 1
    args = argparse.Namespace(instruct_lr=2e-4, instruct_lm_lr_scale=0.25, llm_lora_rank=rank, instruct_more_steps=[])
    assert quality_powered.method_overrides("llm_lora", "tiny", args)[-2:] == [f"cli.llm_lora_rank={rank}",
                                                                              f"cli.llm_lora_alpha={2.0 * rank}"]
    assert quality_powered.method_overrides("instruct_continued", "tiny", args) == [
        "method=instruct", "optim.lr=0.0002", "optim.lm_lr_scale=0.25"]
    longer = argparse.Namespace(**{**vars(args), "instruct_more_steps": [300], "instruct_more_lr": 5e-5})
    assert quality_powered.method_overrides("instruct_continued", "tiny", longer) == [  # the rate it was last at
        "method=instruct", "optim.lr=5e-05", "optim.lm_lr_scale=0.25"]
    with pytest.raises(ValueError, match="no llm_lora rank matches CLI's"):
        quality_powered.matched_lora_rank("tiny", tolerance=0.0)


def test_an_interrupted_run_resumes_under_its_run_name(tmp_path: Path) -> None:
    run = tmp_path / "stage1-instruct-mix"
    assert quality_powered.resume_overrides(run) == []  # never started: a fresh run
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_name": "crosslayer-train-x", "storage_path": str(run / "runs")}))
    assert quality_powered.resume_overrides(run) == ["trainer.run_name=crosslayer-train-x"]


def test_reading_curve_scores_the_kept_checkpoints_by_step_against_the_most_frequent_answer(tmp_path: Path) -> None:
    """The instruct stage's kept checkpoints are found by the step in their name (only those holding a complete
    derived base), and the curve reads each one's accuracy minus the most frequent answer's, per group of types."""
    from cli_module.derived import DERIVED_FILE

    run = tmp_path / "stage1-instruct-mix"
    for step, complete in ((500, True), (250, True), (750, False)):  # 750: its model/ not (yet) written
        model = run / "runs" / "crosslayer-train-x" / f"checkpoint_{step:06d}" / "model"
        model.mkdir(parents=True)
        if complete:
            (model / DERIVED_FILE).write_text("{}")
    (run / "runs" / "crosslayer-train-x" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own file
    assert [s for s, _ in quality_powered.kept_checkpoints(run)] == [250, 500]
    records = [{"type": t} for t in ["arrow"] * 20 + ["color"] * 20]
    guess = np.r_[np.zeros(20), np.ones(10), np.zeros(10)]  # the most frequent answer: right on half the colours
    curve = {500: np.r_[np.ones(20), np.ones(20)], 250: np.r_[np.zeros(20), np.ones(10), np.zeros(10)]}
    rows = quality_powered.reading_rows(curve, guess, records, quality_powered.type_groups(["arrow", "color"]),
                                        {250: 0.9, 500: 0.5})
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| 250", "| 500"]  # by step
    step500 = rows[3].split(" | ")
    assert step500[1] == "0.500" and step500[2:4] == ["1.000", str(paired_difference(curve[500][None], guess[None]))]
    control = np.arange(40) >= 20
    assert step500[4:6] == ["1.000", str(paired_difference(curve[500][None, control], guess[None, control]))]  # +0.5 on colours
    assert rows[2].split(" | ")[3].startswith("0.000")  # step 250 is the prior: no difference


def test_probe_gain_rows_set_the_probe_gap_of_clis_layers_beside_the_realised_gain() -> None:
    """The gap is the best of CLI's vision layers minus the select layer (a layer CLI does not read is left out)."""
    probe = {"select_layer": 12, "types": {"arrow": {"layers": {"3": {"accuracy": 0.7}, "5": {"accuracy": 0.9},
                                                                "12": {"accuracy": 0.4}}}}}
    gain = {"arrow": paired_difference(np.ones((1, 10)), np.zeros((1, 10))),
            "color": paired_difference(np.zeros((1, 10)), np.zeros((1, 10)))}
    rows = quality_powered.probe_gain_rows(probe, gain, [3, 6, 9, 12])
    assert rows[2] == f"| arrow | 0.400 | 0.700 (layer 3) | +0.300 | {gain['arrow']} |"  # layer 5 is not CLI's
    assert rows[3].startswith("| color | - | - | - |")  # a type the probe did not measure


QUESTIONS = {"color": r"What color is the \w+\?", "shape": r"What shape is the \w+ object\?",
             "texture": r"Is the \w+ striped or plain\?", "stripes": r"What is the stripe orientation of the \w+\?",
             "count": r"How many small dots are there\?", "position": r"Which quadrant holds the \w+\?",
             "relation": r"What is (to the left of|to the right of|above|below) the \w+ \w+\?"}


def type_of(question: str) -> str:
    """The control type a ``data synth`` question asks (its template)."""
    question = question.removeprefix("<image>\n")
    return next(t for t, pattern in QUESTIONS.items() if re.fullmatch(pattern, question))


def test_multi_turn_questions_ask_several_types_of_each_training_image(synth: Path) -> None:
    from pipelines.synth import VOCABULARY

    train = [json.loads(x) for x in lines(synth / "train.jsonl")]
    rows = [json.loads(x) for x in lines(multi_turn_questions(synth, 4))]
    assert [r["image"] for r in rows] == [r["image"] for r in train]  # training images only, one conversation each
    for row, first in zip(rows, train):
        conv = row["conversations"]
        assert conv[:2] == first["conversations"]  # its own question first, as train.jsonl asks it
        assert len(conv) == 8 and [t["from"] for t in conv] == ["human", "gpt"] * 4
        asked = [t["value"] for t in conv[0::2]]
        assert all("<image>" not in q for q in asked[1:])  # one image, at the start
        types = [type_of(q) for q in asked]
        assert types[0] == first["type"] and len(set(types)) == 4  # four different types, not one four times
        assert all(t["value"] in VOCABULARY for t in conv[1::2])
    assert lines(multi_turn_questions(synth, 4)) == [json.dumps(r) for r in rows]  # seeded: the same every time
    with pytest.raises(ValueError, match="give 1 to 7"):
        multi_turn_questions(synth, 8)
    mixed = [json.loads(x) for x in lines(instruct_mix(synth, caption_conversations(synth), 4))]
    assert sum(len(r["conversations"]) == 8 for r in mixed) == len(train) and len(mixed) == 2 * len(train)


def test_multi_turn_answers_are_the_scenes_answers(synth: Path) -> None:
    """Each follow-up answer is what the scene says: the colour asked of a shape is that shape's colour."""
    scenes = {json.loads(x)["image"]: json.loads(x)["scene"] for x in lines(synth / "scenes.jsonl")}
    checked = 0
    for row in map(json.loads, lines(multi_turn_questions(synth, 7))):
        objects = scenes[row["image"]]["objects"]
        conv = row["conversations"]
        for q, a in zip(conv[2::2], conv[3::2]):
            if m := re.fullmatch(r"What color is the (\w+)\?", q["value"]):
                assert a["value"] == next(o["color"] for o in objects if o["shape"] == m[1])
                checked += 1
            if m := re.fullmatch(r"Which quadrant holds the (\w+)\?", q["value"]):
                assert a["value"] == next(o["quadrant"] for o in objects if o["shape"] == m[1])
                checked += 1
    assert checked > 10


def test_check_args_refuses_turns_it_would_not_honour() -> None:
    args = argparse.Namespace(instruct_more_steps=[300, 300], instruct_more_turns=[1, 5], instruct_captions=True,
                              probe=None, instruct_steps=1000, methods=["cli"])
    quality_powered.check_args(args)
    with pytest.raises(ValueError, match="one count per --instruct-more-steps run"):
        quality_powered.check_args(argparse.Namespace(**{**vars(args), "instruct_more_turns": [5]}))
    with pytest.raises(ValueError, match="only with --instruct-captions"):
        quality_powered.check_args(argparse.Namespace(**{**vars(args), "instruct_captions": False}))
    with pytest.raises(ValueError, match="counts of >= 1"):
        quality_powered.check_args(argparse.Namespace(**{**vars(args), "instruct_more_turns": [0, 1]}))
    with pytest.raises(ValueError, match="at most 3 runs"):
        quality_powered.check_args(argparse.Namespace(**{**vars(args), "instruct_more_steps": [1] * 4,
                                                         "instruct_more_turns": []}))
