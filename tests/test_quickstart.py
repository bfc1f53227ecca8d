"""`crosslayer quickstart --preset tiny` end to end, in its own process (its own local Ray), every report file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from jobs.scoring import is_correct


def test_quickstart_tiny_writes_the_report(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([str(Path(sys.executable).parent / "crosslayer"), "quickstart", "--preset", "tiny",
                          "--out", str(tmp_path / "report")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report: {tmp_path / 'report'}/results.md" in res.stdout
    for step in range(1, 9):
        assert f"[quickstart {step}/8]" in res.stdout
    report = tmp_path / "report"
    for name in ("results.md", "loss.png", "loss-stage1.png", "gates.png", "captions.jsonl", "summary.json"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    for png in ("loss.png", "gates.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["reports"]) == {"one-to-one (stage-1 model)", "CLI (stage 2)"}
    # each reported accuracy is the share of its answers file's rows that match their reference
    for r in summary["reports"].values():
        rows = [json.loads(x) for x in Path(r["answers_files"]["generate"]).read_text().splitlines()]
        assert r["n"] == len(rows) == 10
        assert r["accuracy"] == sum(is_correct(x["text"], x["metadata"]["reference"]) for x in rows) / len(rows)
    table = (report / "results.md").read_text()
    assert f"| CLI (stage 2) | {summary['reports']['CLI (stage 2)']['accuracy']:.3f} |" in table
    assert re.search(r"stage 1 final loss \d+\.\d{3}, stage 2 final loss \d+\.\d{3} \(eval loss \d+\.\d{3}\)", table), table
    # both stages learned: the held-out loss after training is below the one at step 0
    for stage in ("stage1", "stage2"):
        logged = [json.loads(x) for x in (report / "work" / stage / "metrics.jsonl").read_text().splitlines()]
        evals = [(x["step"], x["eval_loss"]) for x in logged if "eval_loss" in x]
        assert evals[0][0] == 0 and evals[-1][0] == 10 and evals[-1][1] < evals[0][1], (stage, evals)
    # the local cluster serves the State API Ray Train's placement-group cleaner polls: none of its warnings
    assert "Failed to query Ray Train Controller actor state" not in res.stdout + res.stderr
    captions = [json.loads(x) for x in (report / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and all(c["error"] is None for c in captions)
    assert summary["served"]["question"] and summary["stage2"]["steps"] == 10
