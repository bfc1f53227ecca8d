"""Tests for jobs/scoring.py: answer normalisation edge cases, reference lookup, overall and per-type accuracy."""

from __future__ import annotations

import json

import pytest

from jobs.scoring import answer_of, normalize_answer, score, score_file


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
