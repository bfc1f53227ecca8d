"""Tests for jobs/scoring.py, every expected value computed by hand: exact match (normalisation, reference lookup,
per type), VQA soft accuracy with the official answer processing, POPE's yes/no reading and metrics, and the
option letter of multiple-choice answers."""

from __future__ import annotations

import json

import pytest

from jobs.scoring import (
    answer_of,
    choice_letter,
    normalize_answer,
    pope_metrics,
    pope_yes_no,
    score,
    score_choice,
    score_file,
    score_pope,
    score_vqa,
    vqa_accuracy,
    vqa_normalize,
)


@pytest.mark.parametrize("raw, expected", [
    ("The Blue circle.", "blue circle"),
    ("blue circle", "blue circle"),
    ("Three", "3"),
    ("3", "3"),
    ("  top   left \n\nbecause it is up there", "top left"),
    ("\n\n  Horizontal.\n", "horizontal"),
    ("top-left", "top left"),
    ("An orange square!", "orange square"),
    ("a", ""),
    ("", ""),
    (None, ""),
    ("3.5", "3.5"),
    ("Don't know", "dont know"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_of_prefers_answer_then_last_gpt_turn():
    convs = [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "first"},
             {"from": "human", "value": "q2"}, {"from": "gpt", "value": "second"}]
    assert answer_of({"answer": "direct", "conversations": convs}) == "direct"
    assert answer_of({"conversations": convs}) == "second"
    with pytest.raises(ValueError, match="no 'answer'"):
        answer_of({"id": "x", "conversations": [{"from": "human", "value": "q"}]})


def test_score_predictions_file(tmp_path):
    rows = [
        # relation: 2 of 3 right
        {"type": "relation", "prediction": "The Blue circle.", "answer": "blue circle"},
        {"type": "relation", "prediction": "  red\n square", "answer": "red square"},   # first line only: wrong
        {"type": "relation", "prediction": "green   triangle \n", "answer": "green triangle"},
        # count: 3 of 4 right, numbers as words or digits on either side
        {"type": "count", "prediction": "three", "answer": "3"},
        {"type": "count", "prediction": "3", "answer": "three"},
        {"type": "count", "prediction": "Five.", "answer": "five"},
        {"type": "count", "prediction": "", "answer": "two"},                            # empty: wrong
        # color: 0 of 2 right; the reference comes from the last gpt turn
        {"type": "color", "prediction": "red", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "blue"}]},
        {"type": "color", "answer": "green"},                                             # no prediction: wrong
        # untyped: counts overall only
        {"prediction": "Vertical", "answer": "vertical"},
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_file(path)
    assert result["n"] == 10
    assert result["accuracy"] == pytest.approx(6 / 10)
    assert result["per_type"] == {"color": 0.0, "count": 0.75, "relation": pytest.approx(2 / 3)}
    assert result["per_type_n"] == {"color": 2, "count": 4, "relation": 3}
    assert score(rows[:1]) == {"accuracy": 1.0, "n": 1, "per_type": {"relation": 1.0},
                               "per_type_n": {"relation": 1}}


def test_score_empty():
    assert score([]) == {"accuracy": 0.0, "n": 0, "per_type": {}, "per_type_n": {}}


# --- VQA soft accuracy (the official answer processing) -------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("  Two Dogs.", "2 dogs"),          # lowercase, number words, the final period
    ("the cat", "cat"),                 # articles
    ("isnt", "isn't"),                  # contractions written back
    ("couldnt've", "couldn't've"),
    ("1,000", "1000"),                  # digit groups
    ("hot-dog", "hot dog"),             # punctuation inside a word splits it
    ("yes!", "yes"),                    # next to the end it goes
    ("3.5", "3.5"),                     # a decimal point stays
    ("man's hat", "man 's hat"),
    ("black/white", "black white"),
    ("none", "0"),
])
def test_vqa_normalize_follows_the_official_processing(raw, expected):
    assert vqa_normalize(raw) == expected


def test_vqa_accuracy_by_hand():
    # 10 humans; the score averages min(matches among the other 9 / 3, 1) over leaving each one out
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx((9 * 1 / 3) / 10)          # 0.3
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)   # 0.9
    assert vqa_accuracy("two", ["two"] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy("red", ["blue"] * 10) == 0.0
    result = score_vqa([{"prediction": "2", "answers": ["2"] * 2 + ["3"] * 8, "type": "number"},
                        {"prediction": "yes", "answers": ["yes"] * 10, "type": "yes/no"},
                        {"prediction": "no", "answers": ["yes"] * 10, "type": "yes/no"}])
    assert result["accuracy"] == pytest.approx((0.6 + 1 + 0) / 3)
    assert result["per_type"] == pytest.approx({"number": 0.6, "yes/no": 0.5})


# --- POPE ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a dog", "no"),
    ("no", "no"), ("Nope", "yes"), ("Yes. No dog though.", "yes"),  # only the first sentence counts
    ("", "yes"), ("NO", "yes"),  # as eval_pope.py reads it: the words No, no, not
])
def test_pope_reads_yes_or_no_as_llava_does(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_metrics_by_hand():
    # labels: yes yes yes no no; predictions: yes no yes yes no -> TP 2, FN 1, FP 1, TN 1
    records = [{"prediction": p, "label": lab, "type": t} for p, lab, t in [
        ("Yes", "yes", "random"), ("No", "yes", "random"), ("Yes.", "yes", "popular"), ("yes", "no", "popular"),
        ("No.", "no", "popular")]]
    m = score_pope(records)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    assert m["categories"]["random"] == {"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                         "yes_ratio": 0.5, "n": 2, "tp": 1, "fp": 0, "tn": 0, "fn": 1}
    assert m["per_type"] == {"popular": pytest.approx(2 / 3), "random": 0.5}
    nothing_yes = pope_metrics(["no", "no"], ["yes", "no"])  # no "yes" said: precision and F1 are 0, not an error
    assert (nothing_yes["precision"], nothing_yes["recall"], nothing_yes["f1"]) == (0.0, 0.0, 0.0)


# --- multiple choice ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("A) a cat", "A"), ("C is right", "C"), ("The answer is B.", "B"),
    ("dog", "B"),        # the text of one option
    ("E", None),         # not an option here
    ("Bird", "C"),       # an option's text, after normalisation
    ("Birds", None),     # a word, not a letter, and not an option
    ("", None),
])
def test_choice_letter(text, expected):
    assert choice_letter(text, ["cat", "dog", "bird"]) == expected


def test_score_choice_by_hand():
    choices = ["cat", "dog", "bird", "fish"]
    rows = [{"prediction": "A", "answer": "A", "choices": choices, "type": "animal"},
            {"prediction": "The answer is D.", "answer": "D", "choices": choices, "type": "animal"},
            {"prediction": "I cannot tell", "answer": "C", "choices": choices, "type": "scene"}]
    assert score_choice(rows) == {"accuracy": pytest.approx(2 / 3), "n": 3, "per_type": {"animal": 1.0, "scene": 0.0},
                                  "per_type_n": {"animal": 2, "scene": 1}, "unparsed": 1}
