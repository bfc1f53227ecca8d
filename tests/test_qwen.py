"""Qwen2.5-VL and Qwen3-VL as bases (tiny random folders in the hub layout): loading, exactness against the model's
own forward, M-RoPE decoding with a cache, images of different token counts in one batch, Qwen3-VL's own DeepStack
as methods, and the published shapes' parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb, random_images
from hub_checkpoints import save_tiny_checkpoint
from reference_decode import greedy

from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from cli_module.prompting import build_example, chat_prompt

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
CLI = dict(vision_layers=[1, 2, 3], inject_layers=[0, 2], attn_dim=16, heads=4, lora_rank=4)
SIZES = [(60, 40), (120, 100)]  # two images of different token counts (6 and 12 to 16 tokens)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {f: save_tiny_checkpoint(root / f, f) for f in FAMILIES}


def batch(model, sizes=SIZES):
    images = [random_images(1, i, s)[0] for i, s in enumerate(sizes)]
    prompts = [chat_prompt(model.base.tokenizer, "what is this" + "?" * i, family=model.base.kind)
               for i in range(len(images))]
    inputs, visual = model.prepare_inputs(prompts, images=images)
    proc = model.base.image_processor(images=images, return_tensors="pt")
    return inputs, visual, proc


def hf_logits(base, inputs, proc):
    """The model's own forward (transformers), as a user of the checkpoint runs it."""
    mm = (inputs["input_ids"] == base.image_token_id).int()
    return base.model(**inputs, pixel_values=proc["pixel_values"], image_grid_thw=proc["image_grid_thw"],
                      mm_token_type_ids=mm).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_as_a_qwen_base(folders, family):
    base = load_base(str(folders[family]))
    assert base.kind == family and base.qwen and base.grid is None
    assert base.tokenizer.convert_ids_to_tokens(base.image_token_id) == "<|image_pad|>"
    assert base.feature_dim == 4 * base.vision_config.hidden_size  # a 2x2 merge unit of patches
    assert base.select_layer == -1 and base.num_vision_layers == 4
    assert base.image_tokens(7) == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_cli_returns_the_models_own_logits_exactly(folders, family):
    """Two images of different token counts (padded features, left-padded prompts): the untrained plug-in's logits
    equal the Qwen model's own forward bit for bit (window attention, merger, M-RoPE, Qwen3-VL's DeepStack)."""
    base = load_base(str(folders[family]))
    model = FusedVLM(base, CLIConfig(**CLI))
    inputs, visual, proc = batch(model)
    assert len(set(visual.counts)) == 2 and visual.token_mask is not None
    assert visual.counts == (proc["image_grid_thw"].prod(-1) // 4).tolist()
    ref = hf_logits(base, inputs, proc)
    assert torch.equal(model(**inputs, pixel_values=proc["pixel_values"],
                             image_grid_thw=proc["image_grid_thw"]).logits, ref)
    assert torch.equal(model(**inputs, visual=visual).logits, ref)  # prepare_inputs' own encoding


@pytest.mark.parametrize("family", FAMILIES)
def test_select_layer_through_p_is_what_the_model_puts_at_its_image_positions(folders, family):
    base = load_base(str(folders[family]))
    model = FusedVLM(base, CLIConfig(**CLI))
    _, visual, proc = batch(model)
    own = base.model.model.get_image_features(proc["pixel_values"], proc["image_grid_thw"]).pooler_output
    assert torch.equal(visual.image_embeds, torch.cat(own))


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_leak_into_agf(folders, family):
    """A trained plug-in: each image's row in a padded batch gives what it gives alone (AGF masks padded keys)."""
    base = load_base(str(folders[family]))
    model = FusedVLM(base, CLIConfig(**CLI))
    perturb(model)
    inputs, visual, _ = batch(model)
    both = model(**inputs, visual=visual).logits
    alone_inputs, alone_visual, _ = batch(model, SIZES[:1])  # the shorter image, unpadded
    assert alone_visual.token_mask is None
    alone = model(**alone_inputs, visual=alone_visual).logits[0]
    torch.testing.assert_close(both[0, -alone.shape[0]:], alone, rtol=1e-4, atol=1e-4)
    # and the padded keys really are masked: dropping the mask changes the shorter image's row
    masked = visual.token_mask
    visual.token_mask = None
    assert not torch.allclose(model(**inputs, visual=visual).logits[0], both[0], atol=1e-4)
    visual.token_mask = masked


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "image"])
def test_cached_generation_equals_uncached(folders, family, positions):
    """Greedy decoding with the KV cache (M-RoPE text positions + the image's delta) equals full forwards over
    the whole sequence each step (the model's get_rope_index every time)."""
    base = load_base(str(folders[family]))
    model = FusedVLM(base, CLIConfig(**{**CLI, "positions": positions}))
    perturb(model, std=1.0)
    inputs, visual, _ = batch(model)
    cached = greedy(model, inputs["input_ids"], inputs["attention_mask"], visual=visual, max_new_tokens=6)
    uncached = greedy(model, inputs["input_ids"], inputs["attention_mask"], visual=visual, max_new_tokens=6,
                      use_cache=False)
    assert torch.equal(cached, uncached)


def test_shipped_one_to_one_and_cli_on_top_of_qwen3_deepstack(folders):
    """Qwen3-VL: ``shipped`` is the model as published (its DeepStack on), ``one_to_one`` the same model with
    DeepStack off (= the model whose DeepStack mergers output zero), and zero-init ``cli`` sits on top of DeepStack
    (its logits are the shipped model's); a trained CLI changes them."""
    base = load_base(str(folders["qwen3_vl"]))
    shipped = FusedVLM(base, CLIConfig(method="shipped"))
    inputs, visual, proc = batch(shipped)
    ref = hf_logits(base, inputs, proc)
    assert torch.equal(shipped(**inputs, visual=visual).logits, ref)
    assert shipped.param_counts()["trainable_params"] == 0

    off = FusedVLM(base, CLIConfig(method="one_to_one"))
    inputs_off, visual_off, _ = batch(off)
    assert visual_off.deepstack_embeds is None
    silent = copy.deepcopy(base.model)
    with torch.no_grad():
        for merger in silent.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    mm = (inputs["input_ids"] == base.image_token_id).int()
    want = silent(**inputs, pixel_values=proc["pixel_values"], image_grid_thw=proc["image_grid_thw"],
                  mm_token_type_ids=mm).logits
    got = off(**inputs_off, visual=visual_off).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, ref, atol=1e-4)

    cli = FusedVLM(base, CLIConfig(**CLI))
    assert torch.equal(cli(**inputs, visual=batch(cli)[1]).logits, ref)
    perturb(cli)
    assert not torch.allclose(cli(**inputs, visual=batch(cli)[1]).logits, ref, atol=1e-4)


def test_shipped_is_one_to_one_on_qwen2_5_vl_and_deepstack_baseline_runs(folders):
    base = load_base(str(folders["qwen2_5_vl"]))
    inputs, visual, proc = batch(FusedVLM(base, CLIConfig(method="shipped")))
    ref = hf_logits(base, inputs, proc)
    for method in ("shipped", "one_to_one", "projector_ft"):
        model = FusedVLM(base, CLIConfig(method=method))
        assert torch.equal(model(**inputs, visual=batch(model)[1]).logits, ref)
    model = FusedVLM(base, CLIConfig(method="deepstack", vision_layers=[1, 2], inject_layers=[0, 1], lora_rank=4))
    assert torch.equal(model(**inputs, visual=batch(model)[1]).logits, ref)  # zero-init
    perturb(model)
    assert not torch.allclose(model(**inputs, visual=batch(model)[1]).logits, ref, atol=1e-4)
    with pytest.raises(ValueError, match="merger"):
        FusedVLM(base, CLIConfig(method="input_fusion", vision_layers=[1], inject_layers=[0]))
    with pytest.raises(ValueError, match="pool"):
        FusedVLM(base, CLIConfig(**{**CLI, "pool": 2}))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_sequence_expands_qwens_placeholder(folders, family):
    base = load_base(str(folders[family]))
    conv = [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]
    ids, labels = build_example(base.tokenizer, conv, 9)
    assert ids.count(base.image_token_id) == 9
    answer = [t for t, label in zip(ids, labels) if label != -100]
    assert base.tokenizer.decode(answer).startswith("red")


@pytest.mark.parametrize("family", FAMILIES)
def test_base_without_encoder_keeps_the_merger_and_runs_the_features_path(folders, family):
    full = load_base(str(folders[family]))
    model = FusedVLM(full, CLIConfig(**CLI))
    inputs, _, proc = batch(model)
    features = model.encode_images(proc["pixel_values"], image_grid_thw=proc["image_grid_thw"])
    ref = model(**inputs, features=features).logits
    light = load_base(str(folders[family]), vision=False)
    slim = FusedVLM(light, CLIConfig(**CLI))
    assert torch.equal(slim(**inputs, features=features).logits, ref)
    with pytest.raises(RuntimeError, match="not loaded"):
        slim.encode_images(proc["pixel_values"], image_grid_thw=proc["image_grid_thw"])


def test_a_qwen_folder_loads_from_s3(folders, tmp_path, bucket, monkeypatch):
    import boto3

    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    for f in folders["qwen2_5_vl"].iterdir():
        s3.upload_file(str(f), bucket, f"bases/qwen/{f.name}")
    base = load_base(f"s3://{bucket}/bases/qwen")
    assert base.kind == "qwen2_5_vl" and base.name == f"s3://{bucket}/bases/qwen"


@pytest.mark.parametrize("name,total,trainable", [
    ("qwen2.5-vl-3b-shape", 3_763_512_340, 8_889_364),
    ("qwen2.5-vl-7b-shape", 8_307_476_500, 15_309_844),
    ("qwen3-vl-8b-shape", 8_784_540_932, 17_417_236),
])
def test_published_shapes_parameter_counts(name, total, trainable):
    """CLI's default settings on the published Qwen shapes (meta device, nothing allocated): the README's table. The
    bases alone are the published sizes (3.75B, 8.29B, 8.77B)."""
    base = load_base(name)
    counts = FusedVLM(base, CLIConfig()).param_counts()
    assert (counts["total_params"], counts["trainable_params"]) == (total, trainable)
    assert counts["trainable_percent"] < 0.25


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, budget", [("cli", None), ("shipped", None), ("deepstack", None), ("cli", 5),
                                            ("shipped", 5)])
def test_engine_answers_equal_the_uncached_loop(folders, family, method, budget):
    """The decoding engine (serving, captioning and evaluation decode through it): two prompts whose images take
    different token counts, padded AGF image slots, M-RoPE positions with each row's delta; its greedy answers equal
    full forwards without any cache, token for token. With a step budget of 5 tokens (serving's chunked prefill)
    the prompts and their images are written 5 tokens a step: the M-RoPE positions and DeepStack inputs are sliced."""
    from pipelines.generation import OFFLINE, Sampling, complete
    from pipelines.serve_engine import Engine

    base = load_base(str(folders[family]))
    extra = {"method": method, **({"vision_layers": [1, 2], "inject_layers": [0, 2]} if method == "deepstack" else {})}
    model = FusedVLM(base, CLIConfig(**{**CLI, **extra}))
    perturb(model, std=1.0)
    inputs, visual, _ = batch(model)
    engine = None if budget is None else Engine({OFFLINE: model}, max_rows=2, max_prompt_tokens=1 << 30,
                                                max_step_tokens=budget)
    done = complete(model, inputs, visual, Sampling(max_new_tokens=6), engine=engine)
    want = greedy(model, inputs["input_ids"], inputs["attention_mask"], visual=visual, max_new_tokens=6,
                  use_cache=False, eos_token_id=base.tokenizer.eos_token_id)
    tok = base.tokenizer
    for row, c in zip(want.tolist(), done):
        used = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        assert c.tokens == len(used) and c.text == tok.decode(used, skip_special_tokens=True).strip()
