"""Training at scale, at toy size: features streamed per micro-batch from the cache (workers hold tokens and
locations only), tokenisation once (parallel, cached, reused), encoding on the fly without a cache, and the
cache failing loudly under a run (a shard gone or truncated) while transient read errors are retried."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_images

from jobs.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    """24 images used by 48 examples (each image twice), a float16 cache of layers [1, 2]."""
    from pipelines.features import FeatureJob, run_features

    root = tmp_path_factory.mktemp("stream")
    records = [{"id": f"c{i}-{q}", "image": f"images/{i:02d}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": name}]}
        for i, name in enumerate(colour_images(root / "images", 24))
        for q, question in enumerate(("What colour is this image?", "Name the colour."))]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_features(FeatureJob(src=str(root / "images"), out=str(root / "cache"), base="tiny", vision_layers=[1, 2],
                            pool=1, dtype="float16", batch_size=8))
    return root


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={data}/train.jsonl", "data.eval=null", "data.eval_fraction=0.125",
            f"data.features={data}/cache", f"output_dir={out}", "trainer.max_steps=4", "trainer.num_workers=1",
            "trainer.micro_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "trainer.poll_interval_s=0.25", "optim.lr=1e-2", "optim.warmup_steps=1",
            *extra]


def test_tokens_once_in_parallel_and_reused(data, tmp_path):
    from jobs.train import setup

    inline = setup(load_config(CONFIG, overrides(data, tmp_path / "a", "data.tokenize_chunk=1000")))
    parallel = setup(load_config(CONFIG, overrides(data, tmp_path / "b", "data.tokenize_chunk=7")))  # 7 Ray tasks
    assert parallel.data.token_cache == {f"{data}/train.jsonl": False}
    assert [e.input_ids for e in parallel.data.train] == [e.input_ids for e in inline.data.train]
    assert [e.labels for e in parallel.data.eval] == [e.labels for e in inline.data.eval]
    cached = list((tmp_path / "b" / "token-cache").glob("tokens-*.parquet"))
    assert len(cached) == 1
    again = setup(load_config(CONFIG, overrides(data, tmp_path / "b", "data.tokenize_chunk=7")))  # a rerun
    assert again.data.token_cache == {f"{data}/train.jsonl": True}
    assert [e.input_ids for e in again.data.train] == [e.input_ids for e in parallel.data.train]
    # another max_length is another key: tokenised again, next to the first
    setup(load_config(CONFIG, overrides(data, tmp_path / "b", "data.max_length=300")))
    assert len(list((tmp_path / "b" / "token-cache").glob("tokens-*.parquet"))) == 2


def test_each_image_is_stored_once_and_read_by_location(data, tmp_path):
    from jobs.train import setup
    from jobs.train_stream import local_loader

    s = setup(load_config(CONFIG, overrides(data, tmp_path)))
    locations = {e.image_id: e.location for e in [*s.data.train, *s.data.eval]}
    assert len(locations) == 24 and len({e.location for e in s.data.train}) <= 24  # 48 examples, 24 images
    loader = local_loader(s.data, "train", s.pad_id)
    rows = np.arange(8)
    loader.prefetch(rows)
    batch = loader.batch(rows)
    assert batch.features.select_features.shape == (8, 16, 32) and batch.features.layers.shape == (8, 2, 16, 32)
    # the same image read for two examples gives the same features
    first = {}
    for j, i in enumerate(rows):
        image = s.data.train[int(loader.examples.idx[i])].image_id
        if image in first:
            assert torch.equal(batch.features.select_features[j], batch.features.select_features[first[image]])
        first.setdefault(image, j)


def test_transient_read_errors_are_retried_and_a_truncated_shard_is_named(data, tmp_path, monkeypatch):
    import shutil

    import pyarrow.parquet as pq

    from jobs.train import setup
    from jobs.train_stream import FeatureReader

    cache = tmp_path / "cache"
    shutil.copytree(data / "cache", cache)
    s = setup(load_config(CONFIG, overrides(data, tmp_path / "out", f"data.features={cache}")))
    reader = FeatureReader(s.data.cache)
    where = np.array([s.data.train[0].location], dtype=np.int32)
    failures = {"left": 2}
    real = pq.ParquetFile.read_row_group

    def flaky(self, *args, **kwargs):  # a storage hiccup: the first two reads fail like a dropped connection
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("connection reset by peer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", flaky)
    assert reader.read(where)["select"].shape == (1, 16, 32) and failures["left"] == 0
    monkeypatch.undo()
    shard = Path(s.data.cache.shards[where[0, 0]])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RuntimeError, match=rf"feature cache shard {shard} cannot be read .*truncated"):
        FeatureReader(s.data.cache).read(where)


def test_a_shard_that_disappears_under_a_run_fails_it_naming_the_shard(data, tmp_path):
    import shutil

    from ray.train import TrainingFailedError

    from jobs.train import finish, setup, train

    cache = tmp_path / "cache"
    shutil.copytree(data / "cache", cache)
    s = setup(load_config(CONFIG, overrides(data, tmp_path / "out", f"data.features={cache}")))
    gone = s.data.cache.shards[s.data.train[0].location[0]]
    Path(gone).unlink()
    with pytest.raises(TrainingFailedError, match=rf"feature cache shard {gone} is missing"):
        finish(s, train(s))


@pytest.mark.slow
def test_without_a_cache_workers_encode_on_the_fly(data, tmp_path):
    from jobs.train import run_train

    cached = run_train(load_config(CONFIG, overrides(data, tmp_path / "cached")))
    fly = run_train(load_config(CONFIG, overrides(data, tmp_path / "fly", "data.features=null")))
    assert fly["steps"] == cached["steps"] == 4
    adapter = json.loads((tmp_path / "fly" / "adapter" / "adapter_config.json").read_text())
    assert adapter["feature_cache"].startswith("none")
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("cached", "fly")}
    # the same examples in the same order; only the cache's float16 rounding differs
    for a, b in zip(rows["cached"], rows["fly"]):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)


def test_rank_examples_hold_tokens_only(data, tmp_path):
    """A worker's examples: flat token arrays and (shard, row group, row) locations; no feature array."""
    from jobs.train import setup
    from jobs.train_data import rank_sizes, write_examples
    from jobs.train_stream import RankExamples

    s = setup(load_config(CONFIG, overrides(data, tmp_path, "trainer.num_workers=2")))
    uri = write_examples(s.data, str(tmp_path / "examples.parquet"))
    sizes = rank_sizes(s.data, 2, 0)
    ranks = [RankExamples.read(uri, r, 2, 0, {"train": len(s.data.train), "eval": len(s.data.eval)})
             for r in range(2)]
    assert [len(r["train"]) for r in ranks] == sizes["train"] and [len(r["eval"]) for r in ranks] == sizes["eval"]
    assert sorted(np.concatenate([r["train"].idx for r in ranks]).tolist()) == list(range(len(s.data.train)))
    one = ranks[0]["train"]
    arrays = [v for v in vars(one).values() if isinstance(v, np.ndarray)]
    assert all(a.dtype in (np.int32, np.int64) for a in arrays)  # tokens, offsets, indices, locations
    assert one.location.shape == (len(one), 3) and (one.location >= 0).all()
    first = s.data.train[int(one.idx[0])]
    assert one.ids[one.offsets[0]:one.offsets[1]].tolist() == first.input_ids


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_estimate_matches_the_cache_it_predicts(data, dtype, tmp_path):
    """`crosslayer features --estimate` sizes a cache from shapes alone; its tensor bytes equal a real cache's."""
    import pyarrow.parquet as pq

    from cli_module.loading import load_base
    from pipelines.feature_cache import estimate, shard_uris, table_to_numpy
    from pipelines.features import FeatureJob, run_features

    run_features(FeatureJob(src=str(data / "images"), out=str(tmp_path / "cache"), base="tiny", vision_layers=[1, 2],
                            pool=2, dtype=dtype, batch_size=8))
    table = pq.read_table(shard_uris(str(tmp_path / "cache"))[0])
    columns = table_to_numpy(table.drop_columns(["image_id", "source"]))
    real = sum(v[0].nbytes for v in columns.values())
    e = estimate(load_base("tiny", weights=False), [1, 2], 2, dtype, images=558_128, batch_size=32)
    assert e["tensor_bytes_per_image"] == real and e["shapes"] == {"select": [16, 32], "layers": [2, 4, 32]}
    assert e["total_bytes"] == e["bytes_per_image"] * 558_128 and e["shards"] == -(-558_128 // 32)
    big = estimate(load_base("llava-1.5-7b-shape"), [6, 12, 18, 23], 1, "float16", images=1)
    assert big["tensor_bytes_per_image"] == (576 + 4 * 576) * 1024 * 2  # LLaVA-1.5-7B: 576 x 1024 x 2 B = 1.2 MB per layer per image


def test_estimate_command_counts_the_source_or_takes_a_count(data, capsys):
    from jobs.cli import main

    assert main(["features", str(data / "images"), "--estimate", "--base", "tiny", "--layers", "1", "2",
                 "--batch-size", "10"]) == 0
    counted = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert counted["images"] == 24 and counted["shards"] == 3 and counted["tensor_bytes_per_image"] == 3 * 16 * 32 * 2
    assert main(["features", "--estimate", "--images", "558128", "--base", "llava-onevision-0.5b-shape",
                 "--layers", "6", "13", "20", "26", "--pool", "3", "--dtype", "int8"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "558,128 images" in line and "'layers': [4, 81, 1152]" in line
    assert main(["features", str(data / "images"), "--images", "5"]) == 2  # --images only sizes an estimate
    assert "--images goes with --estimate" in capsys.readouterr().err


@pytest.mark.slow
def test_on_the_fly_resume_takes_the_images_from_the_resume_point(data, tmp_path, monkeypatch):
    """A crashed on-the-fly run resumed from its step-2 checkpoint ends with the uninterrupted run's adapter: Ray
    Data decodes the images from the resume point on, in the run's order."""
    from ray.train import TrainingFailedError
    from safetensors.torch import load_file

    from jobs.train import run_train

    args = ["data.features=null", "trainer.checkpoint_every=2", "trainer.max_failures=0"]
    run_train(load_config(CONFIG, overrides(data, tmp_path / "whole", *args, "trainer.run_name=whole")))
    monkeypatch.setenv("CROSSLAYER_FAULTS", json.dumps({"crash_at_step": 3}))
    crashed = overrides(data, tmp_path / "crashed", *args, "trainer.run_name=crashed")
    with pytest.raises(TrainingFailedError, match="crash_at_step=3"):
        run_train(load_config(CONFIG, crashed))
    monkeypatch.delenv("CROSSLAYER_FAULTS")
    assert run_train(load_config(CONFIG, crashed))["steps"] == 4
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
