"""Tests for pipelines/synth.py: determinism, balanced types, answers derivable from scenes and visible in the
pixels, the ``crosslayer data synth`` entry point, config validation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.synth import (
    COLORS,
    DOT_RGB,
    NUMBER_WORDS,
    TYPES,
    VOCABULARY,
    SynthConfig,
    answer_from_scene,
    synthesize,
)

SPLITS = ("train", "val", "test")


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def load(root: Path) -> tuple[list[dict], dict[str, dict]]:
    records = [json.loads(line) for s in SPLITS for line in (root / f"{s}.jsonl").read_text().splitlines()]
    scenes = {row["image"]: row["scene"] for row in map(json.loads, (root / "scenes.jsonl").read_text().splitlines())}
    return records, scenes


@pytest.fixture(scope="module")
def synth64(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth64")
    synthesize(SynthConfig(out=out, n=140, seed=3, image_size=64))
    return out


def test_deterministic_for_a_seed(tmp_path):
    hashes = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthesize(SynthConfig(out=tmp_path / name, n=21, seed=seed, image_size=32))
        hashes[name] = tree_hash(tmp_path / name)
    synthesize(SynthConfig(out=tmp_path / "b", n=40, seed=7, image_size=32))     # rerun smaller: same tree
    synthesize(SynthConfig(out=tmp_path / "b", n=21, seed=7, image_size=32))
    assert tree_hash(tmp_path / "b") == hashes["b"]
    assert hashes["a"] == hashes["b"]
    assert hashes["a"] != hashes["c"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]              # no temp files left behind


def test_types_balanced_per_split_and_overall(synth64):
    records, _ = load(synth64)
    meta = json.loads((synth64 / "meta.json").read_text())
    assert [len(records)] == [meta["n"]] == [140]
    for split in SPLITS:
        rows = [json.loads(line) for line in (synth64 / f"{split}.jsonl").read_text().splitlines()]
        counts = Counter(r["type"] for r in rows)
        assert set(counts) == set(TYPES), split
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        assert meta["counts"][split]["per_type"] == {t: counts[t] for t in TYPES}
    assert set(Counter(r["type"] for r in records).values()) == {20}


def test_records_are_llava_format_with_closed_short_answers(synth64):
    records, scenes = load(synth64)
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": r["answer"]}
        assert r["answer"] in VOCABULARY and r["answer"] == r["answer"].lower()
        assert 1 <= len(r["answer"].split()) <= 3
        assert (synth64 / r["image"]).is_file() and r["image"] in scenes
    captions = [json.loads(line) for line in (synth64 / "captions.jsonl").read_text().splitlines()]
    assert [c["image"] for c in captions] == sorted(scenes)


def test_answers_derivable_from_scenes(synth64):
    records, scenes = load(synth64)
    assert len(records) >= 50
    for r in records:
        assert answer_from_scene(scenes[r["image"]], r["type"], r["params"]) == r["answer"], r


def window_pattern(img: np.ndarray, cx: int, cy: int, rgb: tuple[int, int, int]) -> str:
    """Classify the 5x5 patch around an object's centre: plain, or its stripe orientation."""
    patch = (img[cy - 2: cy + 3, cx - 2: cx + 3] == rgb).all(-1)                 # True where the body colour shows
    if patch.all():
        return "plain"
    if (patch == patch[:, :1]).all():
        return "horizontal"                                                       # every row constant
    if (patch == patch[:1, :]).all():
        return "vertical"                                                         # every column constant
    i, j = np.mgrid[0:5, 0:5]
    if all(len(set(patch[i + j == s])) == 1 for s in range(9)):
        return "diagonal"                                                         # constant along x + y
    return "unknown"


def count_blobs(mask: np.ndarray) -> int:
    seen, blobs = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs, stack = blobs + 1, [(y, x)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return blobs


def test_images_show_the_answers(synth64):
    records, scenes = load(synth64)
    checked = Counter()
    for r in records:
        scene = scenes[r["image"]]
        img = np.asarray(Image.open(synth64 / r["image"]).convert("RGB"))
        assert img.shape == (64, 64, 3)
        if r["type"] in ("color", "texture", "stripes", "position"):
            obj = next(o for o in scene["objects"] if o["shape"] == r["params"]["shape"])
            cx, cy = obj["center"]
            if r["type"] == "color":
                assert tuple(img[cy, cx]) == COLORS[r["answer"]]
            elif r["type"] == "position":
                row, col = r["answer"].split()
                assert (cy >= 32) == (row == "bottom") and (cx >= 32) == (col == "right")
            else:
                pattern = window_pattern(img, cx, cy, COLORS[obj["color"]])
                if r["type"] == "stripes":
                    assert pattern == r["answer"], (r, pattern)
                else:
                    assert pattern in ("plain", "horizontal", "vertical", "diagonal"), (r, pattern)
                    assert (pattern == "plain") == (r["answer"] == "plain"), (r, pattern)
        elif r["type"] == "count":
            assert NUMBER_WORDS[count_blobs((img == DOT_RGB).all(-1))] == r["answer"]
        else:
            continue
        checked[r["type"]] += 1
    assert min(checked.values()) >= 10 and len(checked) == 5


def test_cli_entry_writes_every_file(tmp_path, capsys):
    from jobs.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "60", "--image-size", "64"]) == 0
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "captions.jsonl", "scenes.jsonl", "meta.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list((tmp_path / "images").glob("*.png"))) == 60
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["n"] == 60 and meta["image_size"] == 64 and meta["types"] == list(TYPES)
    assert {s: meta["counts"][s]["total"] for s in SPLITS} == {"train": 48, "val": 6, "test": 6}
    assert json.loads(capsys.readouterr().out)["train"] == 48


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be at least 1, got 0"),
    ({"image_size": 16}, "got 16"),
    ({"val_frac": 1.5}, "val_frac must be in \\[0, 1\\), got 1.5"),
    ({"n": 2, "val_frac": 0.5, "test_frac": 0.5}, "leaves no training record"),
])
def test_config_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(out=tmp_path, **kwargs)


def test_cli_reports_bad_config(tmp_path, capsys):
    from jobs.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "n must be at least 1" in capsys.readouterr().err
