"""jobs/benchmarks.py without a model: each benchmark's files in their published layouts become the questions the
model is asked (prompts, images, every turn), with their references; mismatched files are refused, naming why."""

from __future__ import annotations

import json

import pytest
from benchmark_files import SHORT, mmbench_tsv, pope_files, scienceqa_files, vqav2_files, write_jsonl

from jobs.benchmarks import MC_INSTRUCTION, answer_rows, candidates, read_benchmark, score_items


def test_vqav2_items_carry_the_human_answers_and_answer_type(tmp_path):
    qfile, annotations, images = vqav2_files(tmp_path, [(1, 1, "How many?", "number", ["2"] * 10),
                                                        (2, 2, "Is it red?", "yes/no", ["yes"] * 9 + ["no"]),
                                                        (3, 2, "How many?", "number", ["three"] * 6 + ["2"] * 4)])
    bench = read_benchmark(str(qfile), str(annotations), str(images))
    assert bench.kind == "vqav2" and [it.question_id for it in bench.items] == [1, 2, 3]
    first = bench.items[0]
    assert first.messages == [{"role": "user", "content": "<image>\nHow many?" + SHORT}]
    assert first.image == str(images / "COCO_val2014_000000000001.jpg") and first.category == "number"
    assert bench.items[1].reference == ["yes"] * 9 + ["no"]
    # likelihood candidates: each question's most common (normalised) human answer, pooled per answer type
    assert candidates(bench.kind, bench.items, 8) == [["2", "3"], ["yes"], ["2", "3"]]
    assert score_items(bench.kind, bench.items, ["2", "no", "2"])["accuracy"] == pytest.approx((1.0 + 0.3 + 1.0) / 3)


def test_explicit_benchmark_must_fit_the_references(tmp_path):
    qfile, annotations, images = vqav2_files(tmp_path, [(1, 1, "How many?", "number", ["2"] * 10)])
    with pytest.raises(ValueError, match="--benchmark pope does not fit .* its references are vqav2"):
        read_benchmark(str(qfile), str(annotations), str(images), kind="pope")
    write_jsonl(tmp_path / "partial.jsonl", [{"question_id": 99, "answer": "x"}])
    with pytest.raises(ValueError, match="no reference for question_id 1"):
        read_benchmark(str(qfile), str(tmp_path / "partial.jsonl"), str(images))


def test_pope_pairs_each_category_in_file_order(tmp_path):
    qfile, labels, images = pope_files(tmp_path, {"adversarial": [(1, "dog", "yes"), (2, "cat", "no")],
                                                  "popular": [(3, "car", "no")]})
    bench = read_benchmark(str(qfile), str(labels), str(images))
    assert bench.kind == "pope" and [it.reference for it in bench.items] == ["yes", "no", "no"]
    assert [it.category for it in bench.items] == ["adversarial", "adversarial", "popular"]
    assert candidates(bench.kind, bench.items, 8) == [["yes", "no"], ["yes", "no"], ["no"]]
    (labels / "coco_pope_popular.json").write_text("")  # a category without its labels
    with pytest.raises(ValueError, match="no records"):
        read_benchmark(str(qfile), str(labels), str(images))
    (labels / "coco_pope_popular.json").unlink()
    with pytest.raises(ValueError, match=r"1 question\(s\) of categories \['popular'\] have no POPE label file"):
        read_benchmark(str(qfile), str(labels), str(images))
    # a POPE label file given as the question file carries its own labels
    one = read_benchmark(str(labels / "coco_pope_adversarial.json"), image_root=str(images))
    assert one.kind == "pope" and [it.reference for it in one.items] == ["yes", "no"]


def test_question_records_may_carry_their_references(tmp_path):
    rows = [{"question_id": 1, "image": "a.png", "text": "Which?", "choices": ["cat", "dog"], "answer": "dog"},
            {"question_id": 2, "image": "b.png", "text": "Which?", "choices": ["red", "blue"], "answer": 0}]
    bench = read_benchmark(str(write_jsonl(tmp_path / "mc.jsonl", rows)))
    assert bench.kind == "multiple_choice" and [it.reference for it in bench.items] == ["B", "A"]
    assert bench.items[0].prompt == "Which?\nA. cat\nB. dog" and bench.items[0].instruction == MC_INSTRUCTION
    vqa = read_benchmark(str(write_jsonl(tmp_path / "vqa.jsonl", [
        {"question_id": 3, "image": "c.png", "text": "What?", "answers": [{"answer": "two"}] * 3 + ["3"] * 7}])))
    assert vqa.kind == "vqav2" and vqa.items[0].reference == ["two"] * 3 + ["3"] * 7


def test_mmbench_tsv_prompts_as_llava_asks_them(tmp_path):
    tsv = mmbench_tsv(tmp_path / "mmbench_dev.tsv", [
        {"index": 10, "question": "What is it?", "hint": "A pet.", "A": "cat", "B": "dog", "answer": "B",
         "category": "animal", "image": 1},
        {"index": 11, "question": "Colour?", "A": "red", "B": "blue", "C": "green", "answer": "C",
         "category": "colour", "image": "ref:10"}])
    bench = read_benchmark(str(tsv))
    assert bench.kind == "multiple_choice" and bench.layout == "mmbench_tsv"
    first, second = bench.items
    assert first.question_id == 10 and first.choices == ["cat", "dog"] and first.reference == "B"
    assert first.prompt == "A pet.\nWhat is it?\nA. cat\nB. dog" and first.instruction == MC_INSTRUCTION
    assert first.messages[0]["content"] == "<image>\n" + first.prompt
    assert second.image_b64 == first.image_b64 and second.choices == ["red", "blue", "green"]
    assert score_items(bench.kind, bench.items, ["B", "The answer is A."])["accuracy"] == 0.5
    rows = answer_rows(bench.items, ["B", "A"], "my-model")
    assert [set(r) for r in rows] == [{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}] * 2
    assert rows[0]["question_id"] == 10 and rows[0]["model_id"] == "my-model"


def test_mmbench_test_split_without_answers_is_unscored(tmp_path):
    tsv = mmbench_tsv(tmp_path / "mmbench_test.tsv", [{"index": 1, "question": "Q?", "A": "x", "B": "y",
                                                      "category": "c", "image": 3}])
    bench = read_benchmark(str(tsv))
    assert bench.kind == "unscored" and score_items(bench.kind, bench.items, ["A"]) == {"n": 1, "scored": False}
    assert candidates(bench.kind, bench.items, 8) == [["x", "y"]]  # options: likelihood scoring still works


def test_scienceqa_conversations_and_problems(tmp_path):
    qfile, problems, images = scienceqa_files(tmp_path, {
        "4": {"question": "Which is a mammal?", "choices": ["frog", "cow"], "answer": 1, "image": True},
        "7": {"question": "Which is even?", "choices": ["2", "3"], "answer": 0, "image": False}})
    bench = read_benchmark(str(qfile), str(problems), str(images))
    assert bench.kind == "multiple_choice" and bench.layout == "conversations"
    with_image, text_only = bench.items
    assert with_image.image == str(images / "4" / "image.png") and text_only.image is None
    assert with_image.messages[0]["content"].endswith("<image>") and "<image>" not in text_only.messages[0]["content"]
    assert [it.reference for it in bench.items] == ["B", "A"] and with_image.choices == ["frog", "cow"]


def test_conversations_ask_every_turn_after_the_earlier_replies(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"id": 5, "image": "x.png", "type": "t", "conversations": [
            {"from": "human", "value": "<image>\nQ1?"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2"},
            {"from": "human", "value": "Q3?"}, {"from": "gpt", "value": "A3"}]}])
    bench = read_benchmark(str(data))
    assert bench.kind == "exact" and [it.turn for it in bench.items] == [0, 1, 2]
    third = bench.items[2]
    assert [m["content"] for m in third.messages] == ["<image>\nQ1?", "A1", "Q2?", "A2", "Q3?"]
    assert [it.reference for it in bench.items] == ["A1", "A2", "A3"] and third.image == str(tmp_path / "x.png")
    assert answer_rows(bench.items, ["a", "b", "c"], "m")[2]["metadata"] == {"turn": 2}


def test_records_of_unknown_layout_are_refused(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Q?", "img": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"record 1 has keys \['img', 'question'\]: expected LLaVA's question"):
        read_benchmark(str(tmp_path / "q.jsonl"))
    write_jsonl(tmp_path / "oe.jsonl", [{"question_id": i, "image": "x.png", "text": "What?"} for i in range(3)])
    write_jsonl(tmp_path / "oe_answers.jsonl", [{"question_id": i, "answer": f"a{i}", "category": "open"}
                                                for i in range(3)])
    bench = read_benchmark(str(tmp_path / "oe.jsonl"), str(tmp_path / "oe_answers.jsonl"))
    assert bench.kind == "exact"
    with pytest.raises(ValueError, match="has 3 distinct answers, more than --max-candidates 2"):
        candidates(bench.kind, bench.items, 2)
