"""The paper's recipe as a user runs it: llava-hf checkpoint folders (tiny, random, in the hub's layout), LLaVA's
data files as published (a JSON array, image paths under a separate data root, text-only rows, long multi-turn
rows), LLaVA-OneVision trained from the feature cache, and the shipped recipes checked against the real shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_checkpoints import hub_chat_template, save_tiny_checkpoint

from cli_module.loading import load_base
from jobs.cli import main
from jobs.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
FOLDERS = ["coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K"]
COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220)}


def llava_mix(root: Path) -> tuple[Path, Path]:
    """A 10-row file in the layout of ``llava_v1_5_mix665k.json`` (images under data/, the JSON elsewhere):
    7 image rows (one with <image> after the question, one multi-turn and long), 3 text-only ShareGPT-style rows."""
    from PIL import Image

    data, rows = root / "data", []
    rng = np.random.default_rng(0)
    for i in range(7):
        name = list(COLOURS)[i % 3]
        rel = f"{FOLDERS[i % 5]}/{i:012d}.jpg"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.array(COLOURS[name])[None, None] + rng.integers(-30, 30, (16, 16, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(data / rel, quality=95)
        question = "What colour is this image?\n<image>" if i == 1 else "<image>\nWhat colour is this image?"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": name}]
        if i == 6:  # multi-turn and long: cut at max_length, its first answer kept
            turns += [{"from": "human", "value": "Describe it at length. " * 8},
                      {"from": "gpt", "value": "It is a flat square of one colour. " * 8}]
        rows.append({"id": f"img{i}", "image": rel, "conversations": turns})
    for i in range(3):
        rows.append({"id": f"text{i}", "model": "", "conversations": [
            {"from": "human", "value": f"Say the number {i}."}, {"from": "gpt", "value": f"{i}"}]})
    (root / "json").mkdir()
    path = root / "json" / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(rows, indent=1))
    return path, data


def build_cache(ckpt: Path, mix: Path, data: Path, out: Path) -> dict:
    from pipelines.features import FeatureJob, run_features

    return run_features(FeatureJob(src=str(mix), image_root=str(data), out=str(out), base=str(ckpt),
                                   vision_layers=[1, 2], pool=1, dtype="float16", batch_size=8))


def recipe(ckpt: Path, mix: Path, data: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [f"base={ckpt}", f"data.train={mix}", f"data.image_root={data}", f"data.features={cache}",
            "data.eval=null", "data.eval_fraction=0", f"output_dir={out}", "trainer.num_workers=1", "trainer.micro_batch_size=4",
            "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=0", "trainer.checkpoint_every=0",
            "trainer.poll_interval_s=0.25", "optim.warmup_steps=1", *extra]


@pytest.mark.slow
def test_llava_mix_as_published_trains_with_image_root_text_rows_and_truncation(ray_local, tmp_path):
    from jobs.train import run_train, setup

    ckpt = save_tiny_checkpoint(tmp_path / "llava-1.5-tiny-hf", "llava")
    mix, data = llava_mix(tmp_path)
    summary = build_cache(ckpt, mix, data, tmp_path / "cache")
    assert summary["rows"] == 7 and summary["failed"] == 0  # the text-only rows name no image

    args = recipe(ckpt, mix, data, tmp_path / "cache", tmp_path / "out", "data.max_length=160")
    s = setup(load_config(CONFIG, args))
    image_id = load_base(str(ckpt), weights=False).image_token_id
    assert s.data.cache.image_tokens == 16 and s.data.rows_read["train"] == 10 and s.data.skipped == {}
    assert len(s.data.train) == 10 and s.data.text_only == 3 and s.data.truncated == 1
    by_image = [e for e in s.data.train if e.image_id is not None]
    assert all(e.input_ids.count(image_id) == 16 for e in by_image)
    assert all(image_id not in e.input_ids and e.image_id is None for e in s.data.train[7:])
    long = s.data.train[6]
    assert len(long.input_ids) == 160 and any(x != -100 for x in long.labels)
    # the <image> written after the question trains like the others: moved to the front of its turn
    assert by_image[1].input_ids[:30] == by_image[0].input_ids[:30]

    # data.eval is the mix file too (a user with only that file): evaluation batches of 4 in file order, so the
    # second mixes image and text-only rows and the third holds only text-only rows
    args = [a.replace("data.eval=null", f"data.eval={mix}") for a in args] + ["trainer.eval_batch_size=4"]
    result = run_train(load_config(CONFIG, args))  # mixed micro-batches of image and text-only rows
    assert result["steps"] == 3 and result["text_only"] == 3 + 3 and result["truncated"] == 1 + 1  # train + eval
    assert np.isfinite(result["loss"]) and np.isfinite(result["eval_loss"])
    evals = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert evals and all(np.asarray(r["eval_gates"]).shape == (2, 2) for r in evals)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["truncated"] == 2 and saved["text_only"] == 6


class Rows:
    """The rows ``keep`` of a loader, as a loader: what ``eval_sums`` sees when a split holds only those rows."""

    def __init__(self, loader, keep: list[int]):
        self.loader, self.keep = loader, np.asarray(keep)

    def __len__(self) -> int:
        return len(self.keep)

    def batch(self, rows):
        return self.loader.batch(self.keep[rows])


def test_evaluation_of_text_only_and_mixed_batches(ray_local, tmp_path):
    """A batch of text-only rows evaluates (loss, no gates); in a mixed batch the gates average over the rows
    with an image only, so they equal those of the image rows alone."""
    from conftest import perturb

    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM
    from jobs.train import setup
    from jobs.train_loop import eval_metrics, eval_sums
    from jobs.train_stream import local_loader

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llava")
    mix, data = llava_mix(tmp_path)
    build_cache(ckpt, mix, data, tmp_path / "cache")
    args = [a.replace("data.eval=null", f"data.eval={mix}")
            for a in recipe(ckpt, mix, data, tmp_path / "cache", tmp_path / "out")]
    s = setup(load_config(CONFIG, args))
    base = load_base(str(ckpt))
    model = FusedVLM(base, CLIConfig(vision_layers=[1, 2], inject_layers=[0, 1], attn_dim=16, heads=2, lora_rank=4))
    perturb(model)
    model.eval()
    loader = local_loader(s.data, "eval", pad_id=base.tokenizer.pad_token_id)
    shape = (2, 2)

    def metrics(keep: list[int], batch_size: int) -> dict:
        rows = Rows(loader, keep)
        return eval_metrics(eval_sums(model, rows, batch_size, -(-len(rows) // batch_size), gate_shape=shape), shape)

    text_only = metrics([7, 8, 9], 3)
    assert np.isfinite(text_only["eval_loss"]) and text_only["eval_loss"] > 0 and "eval_gates" not in text_only
    alone, mixed = metrics([0, 2], 2), metrics([0, 7, 2, 8], 4)
    np.testing.assert_allclose(mixed["eval_gates"], alone["eval_gates"], atol=1e-3)
    assert all(0 < g < 1 for row in mixed["eval_gates"] for g in row)


def test_image_root_is_required_where_paths_are_relative_to_it(ray_local, tmp_path):
    from jobs.train import setup

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llava")
    mix, data = llava_mix(tmp_path)
    build_cache(ckpt, mix, data, tmp_path / "cache")
    args = [a for a in recipe(ckpt, mix, data, tmp_path / "cache", tmp_path / "out") if not a.startswith("data.image_root=")]
    with pytest.raises(ValueError, match=r"image not in the feature cache: 7 row\(s\).*json/coco/train2017"):
        setup(load_config(CONFIG, args))


def test_onevision_trains_from_the_cache_on_the_crop_every_job_uses(ray_local, tmp_path):
    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM
    from jobs.train import setup
    from jobs.train_stream import local_loader
    from pipelines.feature_cache import CacheLookup

    ckpt = save_tiny_checkpoint(tmp_path / "llava-onevision-tiny-hf", "llava_onevision")
    mix, data = llava_mix(tmp_path)
    build_cache(ckpt, mix, data, tmp_path / "cache")
    s = setup(load_config(CONFIG, recipe(ckpt, mix, data, tmp_path / "cache", tmp_path / "out")))
    assert s.data.cache.image_tokens == 16 + 1  # a 4x4 grid and OneVision's image_newline
    assert len(s.data.train) == 10 and s.data.text_only == 3

    base = load_base(str(ckpt))
    model = FusedVLM(base, CLIConfig(vision_layers=[1, 2], inject_layers=[0, 1], attn_dim=16, heads=2, lora_rank=4))
    # serving / captioning (pixels) and training / eval (the cache) give the model the same visual input
    from PIL import Image

    images = [Image.open(data / FOLDERS[0] / f"{0:012d}.jpg").convert("RGB")]
    (from_pixels, vis_pixels) = model.prepare_inputs(["<image>\nWhat colour?"], images=images)
    cache = CacheLookup(str(tmp_path / "cache"), base, model.vision_layers, model.config.pool)
    image_ids = list(cache.rows)
    sources = [str(x) for x in cache.columns["source"]]
    row = next(i for i, src in enumerate(sources) if src.endswith(f"{0:012d}.jpg"))
    (from_cache, vis_cache) = model.prepare_inputs(["<image>\nWhat colour?"], features=cache.features([image_ids[row]]))
    assert torch.equal(from_pixels["input_ids"], from_cache["input_ids"]) and vis_pixels.counts == [17]
    torch.testing.assert_close(vis_pixels.image_embeds, vis_cache.image_embeds, atol=2e-2, rtol=2e-2)

    # a mixed micro-batch (image rows and text-only rows) trains: finite loss, gradients on the plug-in
    shard = local_loader(s.data, "train", pad_id=base.tokenizer.pad_token_id)
    batch = shard.batch(np.arange(len(shard)))
    assert batch.features.rows is not None and int(batch.features.rows.sum()) == 7
    out = model(batch.input_ids, batch.attention_mask, features=batch.features, labels=batch.labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.agf[0].out_proj.weight.grad.abs().sum() > 0


def test_text_only_rows_get_no_injection(tiny_base):
    """In a mixed batch, a text-only row's logits are the base's, whatever the trained plug-in holds."""
    from conftest import perturb, random_images

    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM, VisionFeatures

    model = FusedVLM(tiny_base, CLIConfig(vision_layers=[1, 2], inject_layers=[0, 1], attn_dim=16, heads=4))
    perturb(model)
    tok = tiny_base.tokenizer
    prompts = ["USER: " + "<image>" * 16 + " What colour? ASSISTANT:", "USER: Say two. ASSISTANT:"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    pixels = tiny_base.image_processor(images=random_images(1), return_tensors="pt")["pixel_values"]
    feats = model.encode_images(pixels)
    mixed = VisionFeatures(select_features=feats.select_features, layers=feats.layers, rows=torch.tensor([True, False]))
    logits = model(enc["input_ids"], enc["attention_mask"], features=mixed, return_gates=True)
    text = tok([prompts[1]], return_tensors="pt", add_special_tokens=False)
    alone = model(text["input_ids"], text["attention_mask"]).logits  # no image: no injection at all
    n = text["input_ids"].shape[1]
    torch.testing.assert_close(logits.logits[1, -n:], alone[0], atol=1e-5, rtol=1e-5)
    assert logits.gates[1].abs().sum() == 0 and logits.gates[0].abs().sum() > 0
    image_only = model(enc["input_ids"][:1], enc["attention_mask"][:1], features=feats).logits
    torch.testing.assert_close(logits.logits[0], image_only[0], atol=1e-5, rtol=1e-5)


# --- checkpoints: templates as the hub ships them, and the family's format without one -------------------

@pytest.mark.parametrize("family, fmt", [("llava", "json"), ("llava_onevision", "json"), ("llava", None),
                                         ("llava_onevision", None)])
def test_loader_finds_the_chat_template_or_the_family_format(tmp_path, family, fmt):
    from cli_module.prompting import chat_prompt

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", family, chat_template=fmt is not None, template_format=fmt or "jinja")
    base = load_base(str(ckpt))
    prompt = chat_prompt(base.tokenizer, "What colour?")
    if fmt:
        assert base.tokenizer.chat_template == hub_chat_template(family)
    expected = {"llava": "USER: <image>\nWhat colour? ASSISTANT:",
                "llava_onevision": "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"}
    assert prompt.endswith(expected[family]) and "<image>" in prompt


# --- the shipped recipes against the real shapes ------------------------------------------------------------

SHAPES = {"train-llava-ov-0.5b.yaml": "llava-onevision-0.5b-shape", "train-llava-1.5-7b.yaml": "llava-1.5-7b-shape",
          "train-qwen2.5-vl-3b.yaml": "qwen2.5-vl-3b-shape", "train-qwen3-vl-8b.yaml": "qwen3-vl-8b-shape"}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shipped_recipes_validate_against_the_real_shapes(name, capsys):
    path = ROOT / "cluster" / name
    cfg = load_config(path)
    assert cfg.trainer.num_workers * cfg.trainer.micro_batch_size * cfg.trainer.grad_accum == 128  # LLaVA's batch
    assert cfg.trainer.max_steps * 128 >= 665_298 > (cfg.trainer.max_steps - 10) * 128  # one epoch of the mix
    assert main(["params", "--config", str(path), "--base", SHAPES[name]]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["method"] == "cli" and 0 < counts["trainable_percent"] < 1.0


def test_real_shapes_and_the_errors_the_old_recipe_hit(tmp_path):
    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM

    ov, llava = load_base("llava-onevision-0.5b-shape"), load_base("llava-1.5-7b-shape")
    assert (ov.num_vision_layers, ov.grid, ov.num_text_layers) == (26, 27, 24)  # 384 // 14: rounds down
    assert (llava.num_vision_layers, llava.grid, llava.num_text_layers) == (24, 24, 32)
    with pytest.raises(ValueError, match=r"vision layer 27 is out of range for an encoder with 26 layers"):
        FusedVLM(ov, CLIConfig(vision_layers=[6, 13, 20, 27], inject_layers=[2, 8, 14, 20], pool=3))
    with pytest.raises(ValueError, match=r"pool=2 does not divide the 27x27 visual token grid"):
        FusedVLM(ov, CLIConfig(vision_layers=[6, 13, 20, 26], inject_layers=[2, 8, 14, 20], pool=2))
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "cluster" / "train-llava-ov-0.5b.yaml").read_text().replace("[6, 13, 20, 26]", "[6, 13, 20, 27]"))
    assert main(["params", "--config", str(bad), "--base", "llava-onevision-0.5b-shape"]) == 2
