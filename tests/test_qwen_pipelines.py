"""The pipelines on Qwen2.5-VL and Qwen3-VL bases (tiny random folders in the hub layout): a feature cache whose rows
have their own token counts, read back as the pixel path computes them, refused for another base or method;
``--max-pixels`` as the processor's ``max_pixels``; training, evaluation and captioning from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import perturb, random_images
from hub_checkpoints import save_tiny_checkpoint

from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from cli_module.prompting import chat_prompt
from jobs.cli import main
from pipelines.feature_cache import (
    CacheLookup,
    check_serves,
    load_cache_table,
    read_cache_info,
    table_to_numpy,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
CLI = dict(vision_layers=[1, 2, 3], inject_layers=[0, 2], attn_dim=16, heads=4, lora_rank=4)
SIZES = [(60, 40), (120, 100), (90, 90), (40, 120)]  # images of different token counts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-folders")
    return {f: str(save_tiny_checkpoint(root / f, f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-images")
    for i, size in enumerate(SIZES):
        random_images(1, 10 + i, size)[0].save(folder / f"img{i}.png")
    (folder / "broken.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def caches(ray_local, folders, image_folder, tmp_path_factory):
    out = {}
    for family, folder in folders.items():
        out[family] = str(tmp_path_factory.mktemp(f"cache-{family}"))
        assert main(["features", str(image_folder), "--out", out[family], "--base", folder, "--layers", "1", "2", "3",
                     "--batch-size", "3"]) == 0
    return out


def pixel_features(model, paths):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    proc = model.base.image_processor(images=images, return_tensors="pt")
    return model.encode_images(proc["pixel_values"], image_grid_thw=proc["image_grid_thw"]), images


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-3), ("bfloat16", 2e-2), ("int8", 3e-2)])
def test_rows_of_their_own_shapes_round_trip_in_every_storage_dtype(dtype, atol):
    """encode_rows -> Parquet -> decode_column: each row back at its own count, zero-padded to the longest."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.feature_cache import decode_column, encode_rows

    gen = torch.Generator().manual_seed(0)
    counts, width = [3, 7, 5], 8
    rows = [torch.randn(2, n, width, generator=gen) for n in counts]  # (K, N_i, D)
    columns = {"tokens": pa.array(counts, type=pa.int32())}
    columns.update(encode_rows("select", [r[0] for r in rows], dtype))
    columns.update(encode_rows("layers", rows, dtype))
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    batch = table_to_numpy(pq.read_table(io.BytesIO(sink.getvalue())))
    select, layers = decode_column(batch, "select", dtype), decode_column(batch, "layers", dtype)
    assert select.shape == (3, 7, width) and layers.shape == (3, 2, 7, width)
    for i, (r, n) in enumerate(zip(rows, counts)):
        torch.testing.assert_close(layers[i, :, :n], r, atol=atol, rtol=atol)
        torch.testing.assert_close(select[i, :n], r[0], atol=atol, rtol=atol)
        assert not layers[i, :, n:].any() and not select[i, n:].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_rows_have_their_own_token_counts_and_grids(caches, folders, family):
    info = read_cache_info(caches[family])
    assert info["rows"] == len(SIZES) and info["errors"] == 1
    base = load_base(folders[family], weights=False)
    shipped = list(base.vision_config.deepstack_visual_indexes) if family == "qwen3_vl" else []
    assert info["key"].get("deepstack", []) == shipped  # the blocks Qwen3-VL's own DeepStack reads
    batch = table_to_numpy(load_cache_table(caches[family]))
    grids, tokens = np.stack(list(batch["image_grid_thw"])), batch["tokens"]
    assert (grids.prod(-1) // 4 == tokens).all() and len(set(tokens.tolist())) >= 3  # a count per image
    width = base.feature_dim
    for i, n in enumerate(tokens):
        assert batch["select"][i].size == n * width and batch["layers"][i].size == 3 * n * width
        if family == "qwen3_vl":
            assert batch["deepstack"][i].size == len(base.vision_config.deepstack_visual_indexes) * n * width
    assert ("deepstack" in batch) == (family == "qwen3_vl")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_rows_give_the_pixel_paths_features_and_logits(caches, folders, image_folder, family):
    """A batch of cache rows of different counts (padded) = the encoder on the same images, to float16 storage;
    the logits of a trained plug-in from either agree."""
    model = FusedVLM(load_base(folders[family]), CLIConfig(**CLI))
    perturb(model)
    table = load_cache_table(caches[family])
    sources = table["source"].to_pylist()
    lookup = CacheLookup(caches[family], model.base, model.vision_layers, 1, deepstack=model.base_deepstack)
    cached = lookup.features(table["image_id"].to_pylist())
    fresh, images = pixel_features(model, sources)
    assert torch.equal(cached.grids, fresh.grids.to(cached.grids.dtype))
    assert cached.select_features.shape == fresh.select_features.shape  # padded to the longest
    torch.testing.assert_close(cached.select_features, fresh.select_features, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached.layers, fresh.layers, atol=2e-3, rtol=2e-3)
    if family == "qwen3_vl":
        torch.testing.assert_close(cached.deepstack, fresh.deepstack, atol=2e-3, rtol=2e-3)
    prompts = [chat_prompt(model.base.tokenizer, "what is this?", family=family)] * len(images)
    inputs, visual = model.prepare_inputs(prompts, features=cached)
    inputs_px, visual_px = model.prepare_inputs(prompts, images=images)
    assert torch.equal(inputs["input_ids"], inputs_px["input_ids"])
    torch.testing.assert_close(model(**inputs, visual=visual).logits, model(**inputs_px, visual=visual_px).logits,
                               atol=5e-3, rtol=5e-3)


def test_cache_refuses_another_base_or_a_method_that_needs_deepstack(caches, folders, image_folder, tmp_path, capsys):
    qwen3 = load_base(folders["qwen3_vl"], weights=False)
    with pytest.raises(ValueError, match=r"does not match this model: base: cache has .*qwen2_5_vl"):
        check_serves(caches["qwen2_5_vl"], qwen3, [1, 2, 3], 1)
    # a Qwen3-VL cache without the DeepStack blocks: fine for one_to_one, refused for a method that keeps it on
    import shutil

    stripped = tmp_path / "no-deepstack"
    shutil.copytree(caches["qwen3_vl"], stripped)
    info = json.loads((stripped / "cache.json").read_text())
    info["key"].pop("deepstack")
    (stripped / "cache.json").write_text(json.dumps(info))
    check_serves(str(stripped), qwen3, [1, 2, 3], 1, deepstack=False)
    with pytest.raises(ValueError, match=r"deepstack: cache has blocks \[\], this model keeps Qwen3-VL's own "
                                         r"DeepStack on and needs blocks \[\d+(, \d+)*\]"):
        check_serves(str(stripped), qwen3, [1, 2, 3], 1, deepstack=True)
    capsys.readouterr()
    assert main(["features", str(image_folder), "--out", str(tmp_path / "pooled"), "--base", folders["qwen3_vl"],
                 "--layers", "1", "--pool", "2"]) == 2
    assert "--pool 2: a Qwen base's token grid varies per image" in capsys.readouterr().err
    # the probe reads one shape per cache: it refuses a Qwen cache by name rather than misreading it
    from jobs.probe import ProbeJob, run_probe

    with pytest.raises(ValueError, match="rows have their own token counts"):
        run_probe(ProbeJob(cache=caches["qwen2_5_vl"]))


def test_max_pixels_bounds_the_token_count_as_the_processor_does(ray_local, folders, image_folder, tmp_path, capsys):
    """--max-pixels below the processor's own: every image is resized into it (none refused), the counts shrink,
    the bound is in the cache's key, and a model still reads the cache."""
    folder = folders["qwen2_5_vl"]
    base = load_base(folder, weights=False)
    bound = 2 * (4 * 28) ** 2 // 3  # between min_pixels (56^2) and the processor's max (112^2)
    out = str(tmp_path / "bounded")
    assert main(["features", str(image_folder), "--out", out, "--base", folder, "--layers", "1", "2", "3",
                 "--max-pixels", str(bound)]) == 0
    info = read_cache_info(out)
    assert info["rows"] == len(SIZES) and info["key"]["image_processor"]["size"]["longest_edge"] == bound
    grids = np.stack(list(table_to_numpy(load_cache_table(out))["image_grid_thw"]))
    assert (grids[:, 1:].prod(-1) * 14**2 <= bound).all()
    ref = base.image_processor(images=[random_images(1, 10 + i, s)[0] for i, s in enumerate(SIZES)],
                               size={"shortest_edge": 56**2, "longest_edge": bound}, return_tensors="np")["image_grid_thw"]
    assert sorted(map(tuple, grids.tolist())) == sorted(map(tuple, np.asarray(ref).tolist()))
    check_serves(out, base, [1, 2, 3], 1)
    # --estimate sizes a Qwen cache at the bound: an image at the processor's max_pixels, (112 / 28)^2 = 16 tokens
    capsys.readouterr()
    assert main(["features", "--estimate", "--images", "10", "--base", folder, "--layers", "1", "2", "3"]) == 0
    shapes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shapes"]
    assert shapes == {"select": [16, base.feature_dim], "layers": [3, 16, base.feature_dim]}


# --- training, evaluation and captioning from the cache --------------------------------------------------------

COLOURS = ["red", "green", "blue", "yellow"]


def conversations(n: int) -> list[dict]:
    return [{"id": f"q{i}", "image": f"img{i % len(SIZES)}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this image?"},
        {"from": "gpt", "value": COLOURS[i % len(COLOURS)]}]} for i in range(n)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


FAMILY_PARAMS = [pytest.param("qwen2_5_vl"), pytest.param("qwen3_vl", marks=pytest.mark.slow)]  # the second: a repeat


class Trained(dict):
    """family -> (run folder, summary), each family trained on first use."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def __missing__(self, family: str):
        self[family] = self.run(family)
        return self[family]


@pytest.fixture(scope="module")
def trained(caches, folders, image_folder, tmp_path_factory):
    """A few CLI steps of a family through Ray Train + DeepSpeed (2 workers, ZeRO-2) from its Qwen cache."""
    import yaml

    from jobs.train import run_train
    from jobs.train_config import load_config

    def run(key: str | tuple[str, str]):
        family, features = (key, caches[key]) if isinstance(key, str) else (key[0], None)  # (family, "fly"): none
        root = tmp_path_factory.mktemp(f"train-{family}")
        config = {"base": folders[family], "method": "cli", "output_dir": str(root / "out"),
                  "cli": {**CLI, "lora_alpha": 8},
                  "data": {"train": write_jsonl(root / "train.jsonl", conversations(8)),
                           "eval": write_jsonl(root / "eval.jsonl", conversations(2)),
                           "features": features, "image_root": str(image_folder)},
                  # on the fly, one worker: Ray Data's decode tasks need the test cluster's second CPU
                  "trainer": {"num_workers": 2 if features else 1, "max_steps": 3, "micro_batch_size": 2, "log_every": 1,
                              "eval_every": 3, "checkpoint_every": 3, "max_failures": 0, "poll_interval_s": 0.25},
                  "optim": {"lr": 1e-2, "warmup_steps": 1}, "deepspeed": {"zero_stage": 2, "precision": "fp32"}}
        (root / "train.yaml").write_text(yaml.safe_dump(config))
        return root, run_train(load_config(root / "train.yaml", []))

    return Trained(run)


def test_per_image_token_counts_in_the_training_examples(caches, folders, image_folder, tmp_path):
    """Each example's image run is its own image's count from the cache; max_length applies after expanding."""
    from jobs.train_config import TrainConfig
    from jobs.train_data import expand_image, prepare_data

    base = load_base(folders["qwen2_5_vl"], weights=False)
    cfg = TrainConfig.from_dict({"base": folders["qwen2_5_vl"], "cli": CLI, "output_dir": str(tmp_path / "o"),
                                 "data": {"train": write_jsonl(tmp_path / "t.jsonl", conversations(8)),
                                          "features": caches["qwen2_5_vl"], "image_root": str(image_folder),
                                          "eval_fraction": 0, "token_cache": False},
                                 "trainer": {"num_workers": 1, "micro_batch_size": 2}})
    prepared = prepare_data(cfg, base, [1, 2, 3])
    table = table_to_numpy(load_cache_table(caches["qwen2_5_vl"]))
    counts = dict(zip(table["image_id"], table["tokens"].tolist()))
    runs = [sum(t == base.image_token_id for t in e.input_ids) for e in prepared.train]
    assert prepared.cache.per_image and runs == [counts[e.image_id] for e in prepared.train]
    assert len(set(runs)) >= 3
    # without a cache (images encoded on the fly) each count comes from the image's size under the processor
    cfg.data.features = None
    fly = prepare_data(cfg, base, [1, 2, 3])
    assert not fly.cache.uri and fly.cache.per_image
    assert [e.input_ids for e in fly.train] == [e.input_ids for e in prepared.train]
    assert expand_image([5, 9, 6, 7], [-100, -100, 6, 7], 9, 3, 5) == ([5, 9, 9, 9, 6], [-100] * 4 + [6], True)
    assert "would cut its image tokens" in expand_image([5, 9, 6, 7], [-100, -100, 6, 7], 9, 5, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_batch_on_the_fly_equals_one_from_the_cache(caches, folders, image_folder, tmp_path, family):
    """The workers' two feature paths on one micro-batch of images of different counts: cache rows (padded, with
    their grids) and the encoder on decoded patches give the same loss."""
    from jobs.train_config import TrainConfig
    from jobs.train_data import prepare_data
    from jobs.train_stream import local_loader

    model = FusedVLM(load_base(folders[family]), CLIConfig(**CLI))
    perturb(model)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", conversations(4)), "image_root": str(image_folder),
            "eval_fraction": 0, "token_cache": False}
    losses = []
    for features in (caches[family], None):
        cfg = TrainConfig.from_dict({"base": folders[family], "cli": CLI, "output_dir": str(tmp_path / "o"),
                                     "data": {**data, "features": features},
                                     "trainer": {"num_workers": 1, "micro_batch_size": 4}})
        prepared = prepare_data(cfg, model.base, [1, 2, 3])
        batch = local_loader(prepared, "train", model.base.tokenizer.pad_token_id, model).batch(np.arange(4))
        assert batch.features.grids is not None and len(set(batch.features.grids.prod(-1).tolist())) == 4
        with torch.no_grad():
            losses.append(float(model(batch.input_ids, batch.attention_mask, features=batch.features,
                                      labels=batch.labels).loss))
    assert losses[0] == pytest.approx(losses[1], abs=2e-3)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_train_from_the_qwen_cache_through_ray_train_and_deepspeed(trained, folders, family):
    from cli_module.adapter import load_adapter

    root, summary = trained[family]
    rows = [json.loads(x) for x in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert summary["steps"] == 3 and len(losses) == 3 and all(np.isfinite(losses))
    assert [r["step"] for r in rows if "eval_loss" in r][-1] == 3
    model = load_adapter(root / "out" / "adapter", base=load_base(folders[family]))
    assert model.config.method == "cli" and float(model.agf[0].out_proj.weight.detach().abs().max()) > 0


@pytest.mark.slow  # one more training run, its images decoded by Ray Data and encoded by the workers
def test_train_on_the_fly_through_ray_train(trained, folders):
    root, summary = trained["qwen2_5_vl", "fly"]
    assert summary["steps"] == 3
    losses = [json.loads(x)["loss"] for x in (root / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_eval_from_the_cache_equals_eval_from_pixels(trained, caches, image_folder, tmp_path, family):
    """Generation and likelihood scoring of the trained adapter: the cache's answers are the pixel path's."""
    from jobs.evaluate import EvalJob, run_eval

    root, _ = trained[family]
    data = write_jsonl(tmp_path / "questions.jsonl", conversations(4))
    reports = {}
    for name, cache in (("cached", caches[family]), ("pixels", None)):
        reports[name] = run_eval(EvalJob(data=data, image_root=str(image_folder), features=cache,
                                         adapter=str(root / "out" / "adapter"), scoring="both",
                                         out=str(tmp_path / f"{name}.json"), max_new_tokens=3, batch_size=4))
        assert reports[name]["n"] == 4 and reports[name]["method"] == "cli"
    answers = {n: [json.loads(x) for x in (tmp_path / f"{n}.answers.jsonl").read_text().splitlines()]
               for n in reports}
    assert [r["text"] for r in answers["cached"]] == [r["text"] for r in answers["pixels"]]
    choice = {n: [json.loads(x) for x in (tmp_path / f"{n}.answers.choice.jsonl").read_text().splitlines()]
              for n in reports}
    for a, b in zip(choice["cached"], choice["pixels"]):
        assert a["text"] == b["text"]
        assert a["metadata"]["logprobs"] == pytest.approx(b["metadata"]["logprobs"], abs=1e-2)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_caption_from_the_cache_and_from_pixels(trained, caches, image_folder, tmp_path, family):
    from jobs.caption import read_captions

    root, _ = trained[family]
    got = {}
    for name, extra in (("cached", ["--features", caches[family]]), ("pixels", [])):
        assert main(["caption", str(image_folder), "--out", str(tmp_path / name), "--adapter",
                     str(root / "out" / "adapter"), "--max-new-tokens", "4", "--batch-size", "3", *extra]) == 0
        got[name] = {r["source"]: r for r in read_captions(str(tmp_path / name))}
    assert len(got["cached"]) == len(SIZES) + 1  # one row per input, the broken file's with its error
    for source, row in got["pixels"].items():
        assert (row["error"] is None) == (not source.endswith("broken.png"))
        if row["error"] is None:
            assert got["cached"][source]["caption"] == row["caption"] and row["completion_tokens"] > 0


@pytest.mark.slow  # Ray Serve's start and a replica per family: ~40 s beyond the training runs
def test_serve_answers_over_http_as_the_model_does_here(trained, folders):
    """Ray Serve + HTTP (the OpenAI API) on both families' trained adapters: requests with images of different
    token counts, each answered as greedy decoding of the same adapter in this process."""
    import base64
    import io

    from conftest import free_port
    from ray import serve
    from reference_decode import greedy
    from test_serve import http, user

    from cli_module.adapter import load_adapter
    from pipelines.serve import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        apps = [serve.RunTarget(app_builder({"adapters": [f"{family}={trained[family][0] / 'out' / 'adapter'}"],
                                             "num_cpus": 0.4, "ingress_num_cpus": 0.1, "api_key_env": None}),
                                name=family, route_prefix=f"/{family}") for family in FAMILIES]
        serve.run_many(apps)
        for family in FAMILIES:
            model = load_adapter(trained[family][0] / "out" / "adapter", base=load_base(folders[family]))
            tok = model.base.tokenizer
            for i, size in enumerate(SIZES[:2]):
                image = random_images(1, 30 + i, size)[0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                status, body = http(f"http://127.0.0.1:{port}/{family}/v1/chat/completions",
                                    {"model": family, "messages": user("What colour is this image?", url),
                                     "max_tokens": 5, "temperature": 0})
                assert status == 200, body
                enc, visual = model.prepare_inputs([chat_prompt(tok, "What colour is this image?", family=family)],
                                                   [image])
                ids = greedy(model, enc["input_ids"], enc["attention_mask"], visual=visual, max_new_tokens=5,
                             eos_token_id=tok.eos_token_id)[0].tolist()
                ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
                assert body["usage"]["prompt_tokens"] == int(enc["attention_mask"].sum())  # the image's own count
                assert body["choices"][0]["message"]["content"] == tok.decode(ids, skip_special_tokens=True)
    finally:
        serve.shutdown()
