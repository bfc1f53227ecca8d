"""`crosslayer eval` end to end on synthetic data: the report's numbers equal a re-scoring of its predictions."""

from __future__ import annotations

import json

from jobs.cli import main
from jobs.scoring import score


def test_eval_base_on_synthetic_set(ray_local, tmp_path, capsys):
    data = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(data), "--n", "14", "--image-size", "32"]) == 0
    assert main(["features", str(data / "images"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                 "--layers", "0", "1", "2"]) == 0
    report_path = tmp_path / "report.json"
    assert main(["eval", "--base", "tiny", "--data", str(data / "train.jsonl"), "--features", str(tmp_path / "cache"),
                 "--out", str(report_path), "--max-new-tokens", "3"]) == 0
    report = json.loads(report_path.read_text())
    records = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    preds = [json.loads(x) for x in (tmp_path / "report.predictions.jsonl").read_text().splitlines()]
    assert report["n"] == len(records) == len(preds) and 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_type"]) == {r["type"] for r in records}
    assert report == {**report, **score(preds)}  # the report is exactly the scoring of what was predicted
    assert report["method"] == "one_to_one"


def test_eval_refuses_uncached_images(ray_local, tmp_path, capsys):
    data = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(data), "--n", "10", "--image-size", "32"]) == 0
    first = sorted((data / "images").iterdir())[:3]
    (tmp_path / "few").mkdir()
    for p in first:
        (tmp_path / "few" / p.name).write_bytes(p.read_bytes())
    assert main(["features", str(tmp_path / "few"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                 "--layers", "1", "2"]) == 0
    capsys.readouterr()
    assert main(["eval", "--base", "tiny", "--data", str(data / "train.jsonl"),
                 "--features", str(tmp_path / "cache")]) == 2
    assert "have no cached features" in capsys.readouterr().err
