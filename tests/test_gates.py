"""Gate heatmaps: draw_gates writes a PNG for any (T, L, K) array; `crosslayer gates` reads completions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.cli import main
from pipelines.gates import draw_gates

PNG = b"\x89PNG\r\n\x1a\n"


def test_draw_gates_writes_a_png(tmp_path):
    gates = np.random.default_rng(0).random((5, 2, 3))
    out = draw_gates(gates, tmp_path / "sub" / "g.png", [0, 4], [-2, -5, -8], ["a", "b", "\n", "é", "</s>"])
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000
    many = draw_gates(np.zeros((80, 1, 2)), tmp_path / "many.png", [3], [1, 2], [str(i) for i in range(80)])
    assert many.read_bytes().startswith(PNG)


@pytest.mark.parametrize("shape, inject, vision, tokens, message", [
    ((4, 2), [0, 1], [0], None, "shape"),
    ((4, 2, 3), [0], [0, 1, 2], None, "2 injection and 3 vision layers, but inject_layers has 1"),
    ((4, 2, 3), [0, 1], [0, 1, 2], ["a"], "tokens has 1 labels for 4 generated tokens"),
    ((0, 2, 3), [0, 1], [0, 1, 2], None, "no generated token"),
])
def test_draw_gates_errors_carry_the_numbers(tmp_path, shape, inject, vision, tokens, message):
    with pytest.raises(ValueError, match=message):
        draw_gates(np.zeros(shape), tmp_path / "x.png", inject, vision, tokens)


def test_gates_command_reads_completion_or_gates_object(tmp_path, capsys):
    gates = {"values": np.full((3, 2, 4), 0.5).tolist(), "inject_layers": [0, 1], "vision_layers": [0, 1, 2, 3],
             "tokens": ["x", "y", "z"], "shape": [3, 2, 4]}
    (tmp_path / "completion.json").write_text(json.dumps({"object": "chat.completion", "gates": gates}))
    (tmp_path / "gates.json").write_text(json.dumps(gates))
    for name in ("completion", "gates"):
        out = tmp_path / f"{name}.png"
        assert main(["gates", str(tmp_path / f"{name}.json"), "--out", str(out)]) == 0
        assert out.read_bytes().startswith(PNG)
    assert "3 tokens x 2 injection layers x 4 vision layers" in capsys.readouterr().out
    (tmp_path / "none.json").write_text(json.dumps({"object": "chat.completion", "choices": []}))
    assert main(["gates", str(tmp_path / "none.json"), "--out", str(tmp_path / "n.png")]) == 2
    assert "return_gates" in capsys.readouterr().err
