"""bench/layer_probe.py's per-type probes (``--types``, issue 28): what each question type's probe reads, the dual
ridge solve giving the primal's predictions, and the paired bootstrap interval of a layer gap."""

from __future__ import annotations

import numpy as np
import pytest

from bench.layer_probe import (
    PENALTIES,
    TYPE_PROBES,
    cell_token,
    paired_gap_interval,
    quadrant_tokens,
    ridge_predict,
    type_rows,
)
from pipelines.synth import ALL_TYPES, QUADRANTS, add_details, make_scene


def test_every_question_type_has_a_probe_reading_the_scene():
    assert set(TYPE_PROBES) == set(ALL_TYPES)
    rng = np.random.default_rng(5)
    scene = add_details(rng, make_scene(rng, 112))
    tokens = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)              # (N'=4x4, D=3): each token distinct
    objects = scene["objects"]
    striped = [o for o in objects if o["texture"] == "striped"]
    for qtype in ALL_TYPES:
        rows = type_rows(qtype, scene, tokens)
        labels = [label for _, label in rows]
        if qtype in ("color", "shape", "texture", "arrow"):
            assert labels == [o[qtype] for o in objects]
            assert all((f == quadrant_tokens(tokens, o["quadrant"])).all() for (f, _), o in zip(rows, objects))
        elif qtype in ("stripes", "frequency"):
            assert labels == [o[qtype] for o in striped] and striped
        elif qtype == "count":
            assert labels == [str(len(scene["dots"]))] and rows[0][0].shape == (48,)
        elif qtype in ("position", "relation"):
            assert len(rows) == 4 and labels.count("empty") == 4 - len(objects)
        else:
            x, y = scene["mark"]["center"]
            assert labels == [scene["mark"]["color"]]
            assert (rows[0][0] == tokens[(y // 28) * 4 + x // 28]).all()          # the 28-pixel cell holding it
    with pytest.raises(ValueError, match="no probe for question type 'size'"):
        type_rows("size", scene, tokens)


def test_cell_token_maps_pixels_to_the_grid():
    tokens = np.arange(16, dtype=np.float32)[:, None]                           # (16, 1)
    assert cell_token(tokens, [0, 0], 112)[0] == 0
    assert cell_token(tokens, [111, 0], 112)[0] == 3
    assert cell_token(tokens, [28, 56], 112)[0] == 2 * 4 + 1
    assert cell_token(tokens, [111, 111], 112)[0] == 15
    assert QUADRANTS[3] == "bottom right"


def test_ridge_dual_form_predicts_as_the_primal():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(40, 3))
    x = {s: rng.normal(size=(n, 40)) for s, n in (("train", 25), ("val", 30), ("test", 30))}   # 25 rows < 40 features
    y = {s: (v @ w_true).argmax(1) for s, v in x.items()}
    acc, lam, correct = ridge_predict(x, y)                                     # dual: n < F
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    xs = {k: (v - mean) / std for k, v in x.items()}
    onehot = (y["train"][:, None] == np.arange(3)[None]).astype(float)
    w = np.linalg.solve(xs["train"].T @ xs["train"] + lam * 25 * np.eye(40), xs["train"].T @ onehot)  # primal
    assert lam in PENALTIES
    assert (correct == ((xs["test"] @ w).argmax(1) == y["test"])).all()
    assert acc == correct.mean() > 0.5


def test_paired_gap_interval_resamples_groups():
    a = np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert paired_gap_interval(a, a, np.arange(8)) == (0.0, 0.0)
    b = np.zeros(8, dtype=bool)
    lo, hi = paired_gap_interval(a, b, np.array([0, 0, 1, 1, 2, 2, 3, 3]))
    assert 0.5 <= lo <= hi <= 1.0
