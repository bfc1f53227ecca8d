"""Tests for pipelines/synth.py: determinism, balanced types, answers derivable from scenes and visible in the
pixels, the ``crosslayer data synth`` entry point, config validation; the opt-in headroom types (issue 28):
balanced, deterministic, visible in the pixels, and the default seven types' output unchanged by them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.synth import (
    ALL_TYPES,
    ARROW_RGB,
    ARROWS,
    COLORS,
    DOT_RGB,
    FREQUENCIES,
    HEADROOM_TYPES,
    HEADROOM_VOCABULARY,
    NUMBER_WORDS,
    TYPES,
    VOCABULARY,
    SynthConfig,
    _shape_mask,
    add_details,
    answer_from_scene,
    make_question,
    make_scene,
    parse_question_types,
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


# ------------------------------------------------------------------------------------- headroom types (issue 28)

def content_hash(root: Path) -> str:
    """The set's records, captions, scenes, meta and decoded pixels (not the PNG bytes, which zlib may vary)."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "captions.jsonl", "scenes.jsonl", "meta.json"):
        h.update((root / name).read_bytes())
    for path in sorted((root / "images").glob("*.png")):
        h.update(np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))).tobytes())
    return h.hexdigest()


# content_hash of sets made by pipelines/synth.py as it was before the headroom types (commit 29a9874)
BEFORE_HEADROOM = {(70, 5, 112): "b617d7d8fb02f8779e362ac2b543b3e78afab7b2e8387d305e55df4ada1d9ea2",
                   (35, 11, 64): "a7bcc74888b8c12792c17990c8886426b52b860c8e1df0af056b51310ff1fcc4"}


@pytest.mark.parametrize("n, seed, size", sorted(BEFORE_HEADROOM))
def test_default_types_output_unchanged_by_headroom_types(tmp_path, n, seed, size):
    synthesize(SynthConfig(out=tmp_path / "default", n=n, seed=seed, image_size=size))
    assert content_hash(tmp_path / "default") == BEFORE_HEADROOM[(n, seed, size)]
    synthesize(SynthConfig(out=tmp_path / "named", n=n, seed=seed, image_size=size, question_types=TYPES))
    assert content_hash(tmp_path / "named") == BEFORE_HEADROOM[(n, seed, size)]


@pytest.fixture(scope="module")
def headroom112(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("headroom112")
    synthesize(SynthConfig(out=out, n=100, seed=4, image_size=112, question_types=ALL_TYPES))
    return out


def test_headroom_types_generate_llava_records_derivable_from_scenes(headroom112):
    records, scenes = load(headroom112)
    meta = json.loads((headroom112 / "meta.json").read_text())
    assert meta["types"] == list(ALL_TYPES) and meta["details"] is True
    assert set(HEADROOM_VOCABULARY) <= set(meta["vocabulary"]) and set(VOCABULARY) <= set(meta["vocabulary"])
    assert set(Counter(r["type"] for r in records).values()) == {10}
    for split in SPLITS:
        assert sum(meta["counts"][split]["per_type"].values()) == meta["counts"][split]["total"]
    for r in records:
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>\n") and gpt == {"from": "gpt", "value": r["answer"]}
        assert r["answer"] in meta["vocabulary"]
        assert answer_from_scene(scenes[r["image"]], r["type"], r["params"]) == r["answer"], r
        scene = scenes[r["image"]]                      # every image carries the details, whatever its question
        assert "mark" in scene and all("arrow" in o for o in scene["objects"])
        assert all(("frequency" in o) == (o["texture"] == "striped") for o in scene["objects"])
    captions = {c["image"]: c["caption"] for c in map(json.loads, (headroom112 / "captions.jsonl").read_text().splitlines())}
    r = next(r for r in records if r["type"] == "mark")
    assert f"small {r['answer']} square mark" in captions[r["image"]]


def stripe_periods(img: np.ndarray, obj: dict) -> list[int]:
    """The stripe periods (of the three the generator uses at 112 px) the object's pixels fit: dark pixels all on
    the stripe phase, body-colour pixels all off it, along the stripes' normal from the object's centre."""
    rgb = np.array(COLORS[obj["color"]])
    inside = _shape_mask(obj, len(img))                                          # (S, S)
    body, dark = (img == rgb).all(-1) & inside, (img == (rgb * 0.4).astype(np.uint8)).all(-1) & inside
    yy, xx = np.mgrid[0:len(img), 0:len(img)]
    dx, dy = xx - obj["center"][0], yy - obj["center"][1]
    u = {"horizontal": dy, "vertical": dx, "diagonal": dx + dy}[obj["stripes"]]
    assert dark.sum() > 20 and body.sum() > 20
    return [p for p in (2, 4, 6) if (np.mod(u[dark], p) >= p - p // 2).all() and (np.mod(u[body], p) < p - p // 2).all()]


def test_headroom_answers_visible_in_the_pixels(headroom112):
    records, scenes = load(headroom112)
    checked = Counter()
    for r in records:
        scene = scenes[r["image"]]
        img = np.asarray(Image.open(headroom112 / r["image"]).convert("RGB"))
        if r["type"] == "mark":
            (x, y), h = scene["mark"]["center"], scene["mark"]["size"]
            assert (img[y - h: y + h, x - h: x + h] == COLORS[r["answer"]]).all()
            assert (img[y - h - 1, x - h: x + h] != COLORS[r["answer"]]).any(-1).all()   # h is its half-side
        elif r["type"] in ("arrow", "frequency"):
            obj = next(o for o in scene["objects"] if o["shape"] == r["params"]["shape"])
            if r["type"] == "frequency":
                assert stripe_periods(img, obj) == [2 * (FREQUENCIES.index(r["answer"]) + 1)], r
            else:
                (cx, cy), a = obj["center"], obj["arrow_size"]
                white = (img[cy - a: cy + a + 1, cx - a: cx + a + 1] == ARROW_RGB).all(-1)  # (2a+1, 2a+1)
                rows, cols = white.sum(1), white.sum(0)
                tip = {"up": rows[0] < rows[-1], "down": rows[0] > rows[-1],
                       "left": cols[0] < cols[-1], "right": cols[0] > cols[-1]}
                assert [d for d, yes in tip.items() if yes] == [r["answer"]], (r, white.astype(int))
        else:
            continue
        checked[r["type"]] += 1
    assert checked == {"mark": 10, "arrow": 10, "frequency": 10}


def test_headroom_answers_balanced_and_deterministic_by_seed(tmp_path):
    answers = {t: Counter() for t in HEADROOM_TYPES}
    for i in range(600):
        rng = np.random.default_rng([1, i])
        scene = add_details(rng, make_scene(rng, 64))
        qtype = HEADROOM_TYPES[i % 3]
        answers[qtype][answer_from_scene(scene, qtype, make_question(rng, scene, qtype)[1])] += 1
    for qtype, vocab in (("frequency", FREQUENCIES), ("arrow", ARROWS), ("mark", tuple(COLORS))):
        share = {a: answers[qtype][a] / 200 for a in vocab}
        assert set(answers[qtype]) == set(vocab), qtype
        assert max(abs(v - 1 / len(vocab)) for v in share.values()) < 0.1, (qtype, share)

    hashes = {}
    for name, seed in (("a", 2), ("b", 2), ("c", 3)):
        synthesize(SynthConfig(out=tmp_path / name, n=24, seed=seed, image_size=48, question_types=HEADROOM_TYPES))
        hashes[name] = content_hash(tmp_path / name)
    assert hashes["a"] == hashes["b"] != hashes["c"]


def test_question_types_order_and_subset(tmp_path):
    synthesize(SynthConfig(out=tmp_path, n=12, seed=0, image_size=64, question_types=("mark", "color")))
    records, scenes = load(tmp_path)
    by_id = sorted(records, key=lambda r: r["id"])
    assert [r["type"] for r in by_id] == ["mark", "color"] * 6
    assert all("mark" in s for s in scenes.values())                       # a headroom type: details everywhere
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["types"] == ["mark", "color"] and set(meta["levels"]) == {"mark", "color"}
    assert set(meta["counts"]["train"]["per_type"]) == {"mark", "color"}


def test_headroom_question_on_a_plain_scene_is_refused():
    scene = make_scene(np.random.default_rng(0), 64)
    for qtype in HEADROOM_TYPES:
        with pytest.raises(ValueError, match="needs a scene with details"):
            make_question(np.random.default_rng(0), scene, qtype)
        with pytest.raises(ValueError, match="needs a scene with details"):
            answer_from_scene(scene, qtype, {"shape": scene["objects"][0]["shape"]})


@pytest.mark.parametrize("types, message", [
    ((), "question_types is empty"),
    (("color", "colour"), "unknown question type\\(s\\) \\['colour'\\]"),
    (("mark", "mark"), "repeats \\['mark'\\]"),
    ("mark", "got the string 'mark'"),
])
def test_question_types_validation(tmp_path, types, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(out=tmp_path, question_types=types)


def test_parse_question_types_groups():
    assert parse_question_types("control") == TYPES
    assert parse_question_types("headroom") == HEADROOM_TYPES
    assert parse_question_types("all") == ALL_TYPES
    assert parse_question_types("mark, color,headroom") == ("mark", "color", "frequency", "arrow")


def test_cli_question_types(tmp_path, capsys):
    from jobs.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--n", "9", "--image-size", "64",
                 "--question-types", "headroom"]) == 0
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["types"] == list(HEADROOM_TYPES)
    assert main(["data", "synth", "--out", str(tmp_path / "b"), "--n", "9", "--question-types", "texure"]) == 2
    assert "unknown question type(s) ['texure']" in capsys.readouterr().err
