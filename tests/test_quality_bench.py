"""The quality benchmark's data plumbing (bench/quality_powered.py): the caption conversations hold only training
images, the instruct mix holds every training question and caption exactly once, in a seeded order, and each
stage-2 run is paired with the one-to-one answers of the base it stood on (a retrained base is not identical)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality_powered import (  # noqa: E402
    BASE_ANSWERS,
    base_choice,
    caption_conversations,
    export,
    instruct_mix,
    keep_base_answers,
)
from pipelines.synth import SynthConfig, synthesize  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(out=out, n=40, seed=0, image_size=32, val_frac=0.2, test_frac=0.2))
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_caption_conversations_hold_training_images_only(synth: Path) -> None:
    conv = [json.loads(x) for x in lines(caption_conversations(synth))]
    train = {json.loads(x)["image"] for x in lines(synth / "train.jsonl")}
    held_out = {json.loads(x)["image"] for f in ("val.jsonl", "test.jsonl") for x in lines(synth / f)}
    assert {r["image"] for r in conv} == train and not held_out & train
    captions = {json.loads(x)["image"]: json.loads(x)["caption"] for x in lines(synth / "captions.jsonl")}
    for r in conv:  # a LLaVA-Pretrain-style turn: the image, then its own caption as the reply
        assert r["conversations"][0]["value"].startswith("<image>")
        assert r["conversations"][1]["value"] == captions[r["image"]]


def test_instruct_mix_holds_every_question_and_caption_once(synth: Path) -> None:
    captions = caption_conversations(synth)
    first = lines(instruct_mix(synth, captions))
    want = lines(synth / "train.jsonl") + lines(captions)
    assert sorted(first) == sorted(want)  # nothing lost, nothing doubled
    assert first != want  # shuffled: questions and captions interleave
    kinds = ["type" in json.loads(x) for x in first[: len(first) // 2]]
    assert any(kinds) and not all(kinds)
    assert lines(instruct_mix(synth, captions)) == first  # the same order every time (seed 0)


def write_answers(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": i, "text": t, "extra": "cut"}) + "\n"
                            for i, t in enumerate(texts)))


def test_each_run_pairs_with_the_base_it_stood_on(tmp_path: Path) -> None:
    records = [{"answer": a} for a in ("red", "2", "left")]
    first, second = tmp_path / "first" / "eval.answers.choice.jsonl", tmp_path / "second" / "eval.answers.choice.jsonl"
    write_answers(first, ["Red", "3", "left"])  # an earlier training of the base: 2 of 3 right
    write_answers(second, ["blue", "2", "right"])  # the base trained again: 1 of 3
    old, new, bare = tmp_path / "cli-seed0", tmp_path / "cli-seed1", tmp_path / "cli-seed2"
    for run in (old, new, bare):
        run.mkdir()
    keep_base_answers(old, {"answers_files": {"choice": str(first)}})
    # a moved --work: the answers file is found beside eval.json
    keep_base_answers(new, {"answers_files": {"choice": "/gone/eval.answers.choice.jsonl"},
                            "eval_json": str(second.parent / "eval.json")})
    current = np.array([0.0, 0.0, 0.0])
    got = base_choice([old, new, bare], records, current)
    assert [a.tolist() for a in got] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]  # the last has no copy: this work's base
    (old / "summary.json").write_text("{}")
    (bare / "summary.json").write_text("{}")  # a run trained before copies were kept: it stood on this work's base
    write_answers(tmp_path / "stage1-instruct-mix" / "eval.answers.choice.jsonl", ["blue", "2", "left"])
    export(tmp_path, tmp_path / "exported")
    kept = [json.loads(x) for x in lines(tmp_path / "exported" / "cli-seed0" / BASE_ANSWERS)]
    assert [r["text"] for r in kept] == ["Red", "3", "left"] and "extra" not in kept[0]
    filled = [json.loads(x)["text"] for x in lines(tmp_path / "exported" / "cli-seed2" / BASE_ANSWERS)]
    assert filled == ["blue", "2", "left"]
    with pytest.raises(ValueError, match="2 answers for 3 questions"):
        write_answers(old / BASE_ANSWERS, ["red", "2"])
        base_choice([old], records, current)
