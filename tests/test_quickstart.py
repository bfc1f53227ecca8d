"""`crosslayer quickstart --preset tiny` end to end, in its own process (its own local Ray), every report file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


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
    for r in summary["reports"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 10
    table = (report / "results.md").read_text()
    assert f"| CLI (stage 2) | {summary['reports']['CLI (stage 2)']['accuracy']:.3f} |" in table
    captions = [json.loads(x) for x in (report / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and all(c["error"] is None for c in captions)
    assert summary["served"]["question"] and summary["stage2"]["steps"] == 10
