"""`crosslayer probe` on a rigged feature cache whose layers hold known information: layer 0 holds a signal the
select layer (2) lacks, layer 1 is a linear image of the select layer, so the probe must rank 0 above 1 (label-
free and supervised) and suggest layer 0."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.probe import ProbeJob, pool_grid, ridge_accuracy, run_probe, split_of, suggest
from pipelines.feature_cache import CacheKey, encode_column

D, SIDE, IMAGES = 8, 2, 240  # token width, token grid side (4 tokens), images


def rigged_cache(folder, labels_path) -> None:
    """layers [0, 1, 2], select layer 2 (unpooled = pooled: pool 1). Per image: x (4, D) the select layer;
    layer 0 = z, independent of x (a hidden attribute: sign of z's mean first coordinate); layer 1 = x A + 0.05
    noise; layer 2 = x. Labels: type "hidden" answers z's sign, type "visible" answers x's sign."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(D, D))
    x = rng.normal(size=(IMAGES, SIDE * SIDE, D))
    z = rng.normal(size=(IMAGES, SIDE * SIDE, D))
    layers = np.stack([z, x @ a + 0.05 * rng.normal(size=x.shape), x], axis=1)  # (I, K, N, D)
    ids = [f"{i:032x}" for i in range(IMAGES)]
    sources = [f"/data/img{i:04d}.png" for i in range(IMAGES)]
    cols = {"image_id": pa.array(ids), "source": pa.array(sources),
            **encode_column("select", torch.tensor(x, dtype=torch.float32), "float16"),
            **encode_column("layers", torch.tensor(layers, dtype=torch.float32), "float16")}
    folder.mkdir()
    pq.write_table(pa.table(cols), folder / "part-00000.parquet")
    key = CacheKey(base="rigged", revision=None, image_processor={}, select_layer=2, layers=[0, 1, 2], pool=1,
                   dtype="float16")
    (folder / "cache.json").write_text(json.dumps({"key": asdict(key), "rows": IMAGES, "errors": 0}))
    rows = []
    for i in range(IMAGES):
        rows.append({"image": sources[i], "type": "hidden", "answer": "up" if z[i, :, 0].mean() > 0 else "down"})
        rows.append({"image": sources[i], "type": "visible", "answer": "up" if x[i, :, 0].mean() > 0 else "down"})
    labels_path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_probe_ranks_the_layer_with_information_the_select_layer_lacks(ray_local, tmp_path, capsys):
    from jobs.cli import main

    cache, labels = tmp_path / "cache", tmp_path / "labels.jsonl"
    rigged_cache(cache, labels)
    report = run_probe(ProbeJob(cache=str(cache), sample=0, out=str(tmp_path / "p.json"), png=str(tmp_path / "p.png")))
    un = report["unexplained"]
    assert un[0]["unexplained"] > 0.9 and un[1]["unexplained"] < 0.05 and un[2]["unexplained"] < 0.01
    assert un[1]["high"] < un[0]["low"]  # ranked apart, intervals and all
    assert report["suggestion"] == [0, 1, 2] and "label-free" in report["suggestion_basis"]
    assert report["images"]["test"] + report["images"]["fit"] + report["images"]["val"] == IMAGES
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "p.json").read_text())["select_layer"] == 2

    assert main(["probe", str(cache), "--labels", str(labels), "--png", str(tmp_path / "q.png"), "--suggest", "2",
                 "--grid", "1", "--sample", "0", "--out", str(tmp_path / "q.json")]) == 0
    printed = capsys.readouterr().out
    assert "suggested cli.vision_layers: [0, 2] (probes above the select layer's" in printed and "| hidden (" in printed
    sup = json.loads((tmp_path / "q.json").read_text())["supervised"]  # layers as JSON keys
    hidden, visible = sup["hidden"], sup["visible"]
    assert hidden["0"]["accuracy"] > 0.85 and hidden["1"]["high"] < hidden["0"]["low"]  # only layer 0 knows z
    assert hidden["0"]["vs_select"]["low"] > 0 and visible["0"]["vs_select"]["high"] < 0
    assert visible["2"]["accuracy"] > 0.85 and visible["1"]["accuracy"] > 0.85  # x is in the select layer and layer 1


def test_probe_helpers_and_errors(tmp_path):
    assert {split_of(str(i)) for i in range(50)} == {"fit", "val", "test"}
    assert split_of("abc") == split_of("abc")
    grid = np.arange(16, dtype=float).reshape(1, 16, 1)  # a 4 x 4 grid of one channel
    assert pool_grid(grid, 2)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="not a square grid divisible by 3"):
        pool_grid(grid, 3)
    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=(60, 3)) for s in ("fit", "val", "test")}
    acc, _ = ridge_accuracy(xs, {s: (v[:, 0] > 0).astype(int) for s, v in xs.items()})
    assert acc > 0.9
    with pytest.raises(ValueError, match=r"sample \(-1\) must be >= 0"):
        ProbeJob(cache="x", sample=-1)
    base = {"select_layer": 5, "unexplained": {1: {"unexplained": 0.2}, 3: {"unexplained": 0.7},
                                               5: {"unexplained": 0.0}}}
    assert suggest(base, 2) == ([3, 5], "highest 1 - R^2 (label-free)")
    sup = {"t": {5: {"vs_select": {"change": 0.0, "low": 0.0}}, 1: {"vs_select": {"change": 0.4, "low": 0.2}},
                 3: {"vs_select": {"change": 0.1, "low": -0.05}}}}
    assert suggest({**base, "supervised": sup}, 4)[0] == [1, 5]  # layer 3's paired interval holds 0
    with pytest.raises(FileNotFoundError, match="no cache.json"):
        run_probe(ProbeJob(cache=str(tmp_path / "nothing")))
