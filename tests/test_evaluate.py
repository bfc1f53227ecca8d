"""`crosslayer eval` end to end on benchmark files in their published layouts (VQAv2, POPE, MMBench, ScienceQA,
LLaVA conversations), with a tiny hub-layout checkpoint whose answers and log-probabilities are known by hand
(``benchmark_files.rigged_checkpoint``), so every metric below is computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_files import (
    SHORT,
    VOCAB,
    mmbench_tsv,
    pope_files,
    rigged_checkpoint,
    scienceqa_files,
    vqav2_files,
    write_coco_images,
    write_jsonl,
)

from jobs.evaluate import EvalJob, run_eval

LOGIT = 3.0
LOG_Z = math.log(math.exp(LOGIT) + VOCAB - 1)  # every position: log-sum-exp of the rigged logits
ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}  # LLaVA's answers file


@pytest.fixture(scope="module")
def says_2(tmp_path_factory) -> str:
    """Answers "2" to everything."""
    return str(rigged_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-says-2", "2", LOGIT))


@pytest.fixture(scope="module")
def ov_says_2(tmp_path_factory) -> str:
    """LLaVA-OneVision (SigLIP + Qwen2, ChatML, anyres processor) answering "2" to everything."""
    return str(rigged_checkpoint(tmp_path_factory.mktemp("ckpt") / "ov-says-2", "2", LOGIT, "llava_onevision"))


@pytest.fixture(scope="module")
def says_b(tmp_path_factory) -> str:
    """Answers "B" to everything."""
    return str(rigged_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-says-b", "B", LOGIT))


def answers_of(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_vqav2_questions_with_annotations_score_soft_accuracy(ray_local, tmp_path, family, request):
    base = request.getfixturevalue("says_2" if family == "llava" else "ov_says_2")
    questions, annotations, images = vqav2_files(tmp_path, [
        (1001, 1, "How many dogs are there?", "number", ["2", "2"] + ["3"] * 8),  # 2 humans said 2: 0.6
        (1002, 2, "How many cats are there?", "number", ["two"] * 4 + ["3"] * 6),  # "two" is 2: 1.0
        (1003, 1, "What color is the car?", "other", ["red"] * 10),  # 0
        (1004, 3, "Is it sunny?", "yes/no", ["yes"] * 9 + ["2"]),  # 1 human: 0.3
    ])
    qfile = tmp_path / "questions" / questions.name  # the question file away from its images: --image-root
    qfile.parent.mkdir()
    questions.rename(qfile)
    report = run_eval(EvalJob(data=str(qfile), answers=str(annotations), image_root=str(images), base=base,
                              out=str(tmp_path / "vqav2.json"), max_new_tokens=1))
    assert report["benchmark"] == "vqav2" and report["layout"] == "llava_questions" and report["n"] == 4
    assert report["accuracy"] == pytest.approx((0.6 + 1.0 + 0.0 + 0.3) / 4)
    assert report["per_type"] == pytest.approx({"number": 0.8, "other": 0.0, "yes/no": 0.3})
    rows = answers_of(report["answers_files"]["generate"])
    assert [set(r) for r in rows] == [ANSWER_KEYS] * 4
    assert [r["question_id"] for r in rows] == [1001, 1002, 1003, 1004]  # question-file order
    assert [r["text"] for r in rows] == ["2"] * 4 and rows[0]["prompt"] == "How many dogs are there?" + SHORT
    assert rows[0]["model_id"] == f"base:{base}" and len({r["answer_id"] for r in rows}) == 4
    assert json.loads((tmp_path / "vqav2.json").read_text())["accuracy"] == pytest.approx(0.475)
    assert report["compute"]["device"] == "cpu" and report["dtypes_used"] == ["float32"]


@pytest.mark.slow
def test_pope_label_folder_generation_and_likelihood(ray_local, tmp_path, says_2):
    questions, labels, images = pope_files(tmp_path, {
        "adversarial": [(1, "dog", "yes"), (2, "cat", "no"), (3, "car", "no")],
        "random": [(1, "person", "yes"), (4, "bus", "yes"), (2, "kite", "no"), (5, "cup", "yes")],
    })
    report = run_eval(EvalJob(data=str(questions), answers=str(labels), image_root=str(images), base=says_2,
                              scoring="both", answers_file=str(tmp_path / "answers" / "pope.jsonl"),
                              max_new_tokens=1))
    # generation answers "2", which POPE reads as "yes": 4 of the 7 labels are yes
    gen = report["by_scoring"]["generate"]
    assert report["benchmark"] == "pope" and report["scoring"] == "generate" and gen["accuracy"] == pytest.approx(4 / 7)
    assert (gen["precision"], gen["recall"], gen["yes_ratio"]) == (pytest.approx(4 / 7), 1.0, 1.0)
    assert gen["f1"] == pytest.approx(8 / 11)  # 2 * (4/7) * 1 / (4/7 + 1)
    assert gen["categories"]["adversarial"]["accuracy"] == pytest.approx(1 / 3)
    assert gen["categories"]["adversarial"]["f1"] == pytest.approx(0.5)
    assert gen["categories"]["random"]["f1"] == pytest.approx(6 / 7) and gen["per_type_n"] == {"adversarial": 3,
                                                                                                "random": 4}
    # likelihood between the label set {yes, no}: " no" is 3 tokens, " yes" 4, none of them "2": "no" wins
    choice = report["by_scoring"]["choice"]
    assert choice["accuracy"] == pytest.approx(3 / 7) and choice["yes_ratio"] == 0.0
    assert (choice["precision"], choice["recall"], choice["f1"]) == (0.0, 0.0, 0.0)
    rows = answers_of(tmp_path / "answers" / "pope.choice.jsonl")
    assert [r["text"] for r in rows] == ["no"] * 7
    assert rows[0]["metadata"]["logprobs"] == pytest.approx({"yes": -4 * LOG_Z, "no": -3 * LOG_Z}, abs=1e-4)
    assert [r["text"] for r in answers_of(tmp_path / "answers" / "pope.jsonl")] == ["2"] * 7


def test_pope_labels_out_of_order_are_refused(tmp_path):
    questions, labels, images = pope_files(tmp_path, {"random": [(1, "dog", "yes"), (2, "cat", "no")]})
    lines = (labels / "coco_pope_random.json").read_text().splitlines()
    (labels / "coco_pope_random.json").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(ValueError, match=r"question 1 \(question_id 1\): image 'COCO_val2014_000000000001.jpg', "
                                         r"its label is for 'COCO_val2014_000000000002.jpg'"):
        run_eval(EvalJob(data=str(questions), answers=str(labels), image_root=str(images), base="tiny"))


@pytest.mark.slow
def test_mmbench_tsv_by_letter_and_by_option_likelihood(ray_local, tmp_path, says_b):
    tsv = mmbench_tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", [
        {"index": 0, "question": "What animal is this?", "A": "cat", "B": "dogs", "C": "birds", "D": "fishes",
         "answer": "A", "category": "animal", "image": 1},
        {"index": 1, "question": "Which colour?", "hint": "Look closely.", "A": "red", "B": "Blue", "C": "green",
         "answer": "B", "category": "colour", "image": 2},
        {"index": 2, "question": "Which label?", "A": "xy", "B": "By", "C": "zzz", "answer": "B", "category": "text",
         "image": "ref:0"},  # the image of row 0, as MMBench stores repeats
    ])
    report = run_eval(EvalJob(data=str(tsv), base=says_b, scoring="both", out=str(tmp_path / "mmbench.json"),
                              max_new_tokens=1))
    assert report["benchmark"] == "multiple_choice" and report["layout"] == "mmbench_tsv"
    gen, choice = report["by_scoring"]["generate"], report["by_scoring"]["choice"]
    # generation answers "B": right where B is the answer
    assert gen["accuracy"] == pytest.approx(2 / 3) and gen["unparsed"] == 0
    assert gen["per_type"] == {"animal": 0.0, "colour": 1.0, "text": 1.0}
    # likelihood of " option": each token costs log Z, a "B" token earns 3: cat (A), red (A), By (B)
    assert choice["accuracy"] == pytest.approx(2 / 3)
    assert choice["per_type"] == {"animal": 1.0, "colour": 0.0, "text": 1.0}
    rows = answers_of(tmp_path / "mmbench.answers.choice.jsonl")
    assert [r["text"] for r in rows] == ["A", "A", "B"] and [r["question_id"] for r in rows] == [0, 1, 2]
    assert rows[1]["metadata"]["logprobs"] == pytest.approx(
        {"red": -4 * LOG_Z, "Blue": LOGIT - 5 * LOG_Z, "green": -6 * LOG_Z}, abs=1e-4)
    assert rows[1]["prompt"] == "Look closely.\nWhich colour?\nA. red\nB. Blue\nC. green"
    assert [r["text"] for r in answers_of(tmp_path / "mmbench.answers.jsonl")] == ["B", "B", "B"]


@pytest.mark.slow
def test_scienceqa_conversations_with_problems_json_and_text_questions(ray_local, tmp_path, says_b):
    questions, problems, images = scienceqa_files(tmp_path, {
        "4": {"question": "Which is a mammal?", "choices": ["frog", "cow"], "answer": 1, "image": True},
        "7": {"question": "Which number is even?", "choices": ["2", "3"], "answer": 0, "image": False},
        "9": {"question": "Which is a bird?", "choices": ["owl", "Bee", "ant"], "answer": 1, "image": True},
    })
    report = run_eval(EvalJob(data=str(questions), answers=str(problems), image_root=str(images), base=says_b,
                              out=str(tmp_path / "sqa.json"), max_new_tokens=1, batch_size=3))
    assert report["benchmark"] == "multiple_choice" and report["layout"] == "conversations"
    assert report["accuracy"] == pytest.approx(2 / 3) and report["n"] == 3  # B is right for 4 and 9, not for 7
    rows = answers_of(tmp_path / "sqa.answers.jsonl")
    assert [r["question_id"] for r in rows] == ["4", "7", "9"] and [r["text"] for r in rows] == ["B"] * 3
    assert rows[1]["prompt"].startswith("Context: N/A\nQuestion: Which number is even?")


def test_every_turn_is_asked_from_the_feature_cache_in_bfloat16(ray_local, tmp_path, says_2):
    """A CLI adapter (untrained: its injection adds exactly zero, so the rigged answers stay known) over the
    feature cache, in bfloat16, on conversation records."""
    from cli_module.adapter import save_adapter
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from pipelines.features import FeatureJob, run_features

    adapter = tmp_path / "adapter"
    save_adapter(FusedVLM(load_base(says_2), CLIConfig(vision_layers=[1], inject_layers=[0, 1], attn_dim=16,
                                                       heads=2, lora_rank=4)), adapter)

    images = tmp_path / "data" / "coco" / "val2014"
    write_coco_images(images, [1, 2])
    data = write_jsonl(tmp_path / "json" / "multi.jsonl", [
        {"id": "a", "image": "coco/val2014/COCO_val2014_000000000001.jpg", "type": "count", "conversations": [
            {"from": "human", "value": "<image>\nHow many dogs?"}, {"from": "gpt", "value": "2"},
            {"from": "human", "value": "And cats?"}, {"from": "gpt", "value": "3"}]},
        {"id": "b", "image": "coco/val2014/COCO_val2014_000000000002.jpg", "type": "count", "answer": "two",
         "conversations": [{"from": "human", "value": "How many birds?\n<image>"}, {"from": "gpt", "value": "two"}]},
    ])
    run_features(FeatureJob(src=str(data), image_root=str(tmp_path / "data"), out=str(tmp_path / "cache"),
                            base=says_2, vision_layers=[1], dtype="float16"))
    report = run_eval(EvalJob(data=str(data), image_root=str(tmp_path / "data"), features=str(tmp_path / "cache"),
                              adapter=str(adapter), out=str(tmp_path / "multi.json"), max_new_tokens=1,
                              dtype="bfloat16"))
    # three questions: "2" (right), "3" (wrong), "two" (right: numbers are normalised)
    assert report["benchmark"] == "exact" and report["n"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    assert report["per_type"] == {"count": pytest.approx(2 / 3)}
    assert report["dtypes_used"] == ["bfloat16"] and report["compute"]["dtype"] == "bfloat16"
    assert report["method"] == "cli" and report["model_id"] == "adapter"
    rows = answers_of(tmp_path / "multi.answers.jsonl")
    assert [(r["question_id"], r["metadata"].get("turn", 0), r["prompt"]) for r in rows] == [
        ("a", 0, "How many dogs?"), ("a", 1, "And cats?"), ("b", 0, "How many birds?")]
    assert [r["metadata"]["reference"] for r in rows] == ["2", "3", "two"]
    # a question whose image the cache lacks is refused before any model work
    extra = write_jsonl(tmp_path / "json" / "more.jsonl", [
        {"id": "c", "image": "coco/val2014/missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "2"}]}])
    with pytest.raises(ValueError, match=r"1 question\(s\) have no cached features"):
        run_eval(EvalJob(data=str(extra), image_root=str(tmp_path / "data"), features=str(tmp_path / "cache"),
                         base=says_2))


def test_questions_reached_through_a_linked_folder_join_the_cache_built_from_the_folder(tmp_path):
    from jobs.benchmarks import EvalItem
    from jobs.evaluate import join_to_cache

    real = tmp_path / "frozen" / "data"
    write_coco_images(real / "images", [1, 2])
    (tmp_path / "instruct").mkdir()
    (tmp_path / "instruct" / "data").symlink_to(real, target_is_directory=True)
    cache = {str(real / "images" / "COCO_val2014_000000000001.jpg"): "id1",
             str(real / "images" / "COCO_val2014_000000000002.jpg"): "id2"}
    asked = [EvalItem(question_id=i, messages=[], prompt="Q?",
                      image=str(tmp_path / "instruct" / "data" / "images" / f"COCO_val2014_00000000000{i}.jpg"))
             for i in (2, 1)]
    assert join_to_cache(asked, cache, set(cache.values())) == ["id2", "id1"]
    # a cache built through the link joins questions that name the folder itself
    linked = {str(tmp_path / "instruct" / "data" / "images" / "COCO_val2014_000000000001.jpg"): "id1"}
    direct = EvalItem(question_id=3, messages=[], prompt="Q?", image=str(real / "images" / "COCO_val2014_000000000001.jpg"))
    assert join_to_cache([direct], linked, {"id1"}) == ["id1"]
    with pytest.raises(ValueError, match=r"1 question\(s\) have no cached features"):
        join_to_cache([EvalItem(question_id=4, messages=[], prompt="Q?", image=str(real / "other.jpg"))], cache,
                      set(cache.values()))


@pytest.mark.slow
def test_unscored_questions_write_answers_for_the_official_server(ray_local, tmp_path, says_2):
    write_coco_images(tmp_path / "test2015", [5])
    qfile = write_jsonl(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 7, "image": "COCO_val2014_000000000005.jpg", "text": "What is it?" + SHORT,
         "category": "default"}])
    report = run_eval(EvalJob(data=str(qfile), image_root=str(tmp_path / "test2015"), base=says_2,
                              answers_file=str(tmp_path / "merge.jsonl"), max_new_tokens=2, stop=["22"]))
    assert report["benchmark"] == "unscored" and report["scored"] is False and "accuracy" not in report
    (row,) = answers_of(tmp_path / "merge.jsonl")
    assert row["question_id"] == 7 and row["text"] == ""  # "22" is a stop string: the answer ends before it
    assert row["metadata"]["completion_tokens"] == 2


@pytest.mark.slow
def test_eval_command_line_on_the_synthetic_set(ray_local, tmp_path, capsys):
    from jobs.cli import main
    from jobs.scoring import score

    data = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(data), "--n", "14", "--image-size", "32"]) == 0
    assert main(["features", str(data / "images"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                 "--layers", "0", "1", "2"]) == 0
    report_path = tmp_path / "report.json"
    assert main(["eval", "--base", "tiny", "--data", str(data / "train.jsonl"), "--features", str(tmp_path / "cache"),
                 "--out", str(report_path), "--max-new-tokens", "3"]) == 0
    report = json.loads(report_path.read_text())
    records = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    rows = answers_of(tmp_path / "report.answers.jsonl")
    assert report["n"] == len(records) == len(rows) and report["method"] == "one_to_one"
    assert set(report["per_type"]) == {r["type"] for r in records}
    rescored = score([{"prediction": a["text"], "answer": r["answer"], "type": r["type"]}
                      for a, r in zip(rows, records)])
    assert report == {**report, **rescored}  # the report is exactly the scoring of what was answered
    assert "eval (exact, generate): accuracy" in capsys.readouterr().out
