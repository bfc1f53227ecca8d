"""Derived bases (cli_module.derived): the instruct method's fine-tuned projector and LLM saved over their source
base, loaded back as a base by name, and fed by the source's feature caches."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb

from cli_module.config import CLIConfig
from cli_module.derived import DERIVED_FILE, DERIVED_WEIGHTS, save_derived
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from pipelines.feature_cache import cache_key_for


def tuned_tiny(seed: int = 0):
    """A tiny base whose projector and LLM were changed, as instruct training changes them."""
    model = FusedVLM(load_base("tiny"), CLIConfig(method="instruct"))
    perturb(model, std=0.05, seed=seed)
    return model.base


def test_instruct_trains_projector_and_llm_never_the_encoder():
    model = FusedVLM(load_base("tiny"), CLIConfig(method="instruct"))
    base = model.base
    assert all(p.requires_grad for p in base.projector.parameters())
    assert all(p.requires_grad for p in base.language_model.parameters())
    assert all(p.requires_grad for p in base.lm_head.parameters())
    assert not any(p.requires_grad for p in base.vision_tower.parameters())
    # counted from the parts that instruct trains (P, the LLM, its head; a tied head counted once), not from the
    # requires_grad flags param_counts reads
    parts = {id(p): p for m in (base.projector, base.language_model, base.lm_head) for p in m.parameters()}
    encoder = sum(p.numel() for p in base.vision_tower.parameters())
    counts = model.param_counts()
    assert counts["trainable_params"] == sum(p.numel() for p in parts.values())
    assert counts["total_params"] - counts["trainable_params"] == encoder > 0
    assert model.trains_base and not model.projector_modified and model.adapter_state_dict() == {}


def test_saved_weights_load_back_as_a_base(tmp_path):
    tuned = tuned_tiny()
    save_derived(tuned, tmp_path / "d", "tiny", tuned.revision, extra={"train_step": 3})
    meta = json.loads((tmp_path / "d" / DERIVED_FILE).read_text())
    assert meta["source"] == "tiny" and meta["tied"] == {} and meta["extra"] == {"train_step": 3}

    loaded = load_base(str(tmp_path / "d"))
    fresh = load_base("tiny")
    for part in ("projector", "language_model", "lm_head"):
        for (name, p), q in zip(getattr(loaded, part).named_parameters(), getattr(tuned, part).parameters()):
            assert torch.equal(p, q), f"{part}.{name} did not load"
    assert not torch.equal(loaded.projector.linear_1.weight, fresh.projector.linear_1.weight)
    for p, q in zip(loaded.vision_tower.parameters(), fresh.vision_tower.parameters()):
        assert torch.equal(p, q)  # the encoder is the source's
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.name == str(tmp_path / "d") and loaded.revision == meta["weights_sha256"][:16]
    assert loaded.encoder_identity == ("tiny", fresh.revision)
    # the source's feature caches serve it: the cache key depends on the encoder only
    assert cache_key_for(loaded, [1, 2], 1, "float16") == cache_key_for(fresh, [1, 2], 1, "float16")
    # a derived base of a derived base keeps the first source's encoder identity
    save_derived(loaded, tmp_path / "dd", str(tmp_path / "d"), loaded.revision)
    assert load_base(str(tmp_path / "dd")).encoder_identity == ("tiny", fresh.revision)
    # weights=False (drivers checking configs and cache keys) reads no weight file, and names the base the same
    light = load_base(str(tmp_path / "d"), weights=False)
    assert light.name == loaded.name and light.encoder_identity == loaded.encoder_identity
    assert torch.equal(light.projector.linear_1.weight, fresh.projector.linear_1.weight)
    encoder_only = load_base(str(tmp_path / "d"), language=False)  # what `crosslayer features --base DIR` loads
    assert encoder_only.encoder_identity == ("tiny", fresh.revision) and encoder_only.language_model.embed_tokens.weight.is_meta


def test_tied_head_is_stored_once_and_must_match(tmp_path):
    tuned = tuned_tiny()
    tuned.model.lm_head.weight = tuned.language_model.embed_tokens.weight  # tie, as SmolLM2 / Qwen2 do
    save_derived(tuned, tmp_path / "tied", "tiny", tuned.revision)
    meta = json.loads((tmp_path / "tied" / DERIVED_FILE).read_text())
    assert meta["tied"] == {"lm_head.weight": "language_model.embed_tokens.weight"}
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / DERIVED_WEIGHTS))
    with pytest.raises(ValueError, match="tied weights .* differ from the source base's"):
        load_base(str(tmp_path / "tied"))  # tiny's head is untied: this folder is not of it


def test_bad_folders_are_refused_with_the_fix(tmp_path):
    tuned = tuned_tiny()
    save_derived(tuned, tmp_path / "d", "tiny", tuned.revision)
    meta_path = tmp_path / "d" / DERIVED_FILE
    meta = json.loads(meta_path.read_text())

    with pytest.raises(ValueError, match="revision 'abc' asked for"):
        load_base(str(tmp_path / "d"), revision="abc")
    meta_path.write_text(json.dumps({**meta, "source": "tiny-onevision"}))
    with pytest.raises(ValueError, match="weights do not fit source base 'tiny-onevision'.*load it over the base"):
        load_base(str(tmp_path / "d"))
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(ValueError, match="lacks 'weights_sha256'"):
        load_base(str(tmp_path / "d"))
    meta_path.write_text(json.dumps({**meta, "format": 9}))
    with pytest.raises(ValueError, match="derived-base format 9"):
        load_base(str(tmp_path / "d"))


def test_a_derived_base_loads_from_s3(tmp_path, bucket, monkeypatch):
    """An s3:// prefix holding a derived folder (moto over HTTP): mirrored once, named by its URI."""
    import boto3

    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path / "cache"))
    tuned = tuned_tiny(seed=2)
    save_derived(tuned, tmp_path / "d", "tiny", tuned.revision)
    s3 = boto3.client("s3")
    for name in (DERIVED_WEIGHTS, DERIVED_FILE):
        s3.upload_file(str(tmp_path / "d" / name), bucket, f"bases/d/{name}")
    loaded = load_base(f"s3://{bucket}/bases/d")
    assert loaded.name == f"s3://{bucket}/bases/d" and loaded.encoder_identity == ("tiny", "seed0")
    assert torch.equal(loaded.projector.linear_1.weight, tuned.projector.linear_1.weight)
