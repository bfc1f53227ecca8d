"""The quality benchmark's data plumbing (bench/quality_powered.py): the caption conversations hold only training
images, and the instruct mix holds every training question and caption exactly once, in a seeded order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality_powered import caption_conversations, instruct_mix  # noqa: E402
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
