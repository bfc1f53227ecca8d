"""Batch captioning with Ray Data: one row per input (errors included), resume, S3, the feature cache path, and
sampling, stop strings and the model dtype from the command line."""

from __future__ import annotations

import json

import boto3
import pyarrow.parquet as pq
import pytest
from conftest import perturb
from test_features import write_images

from cli_module.adapter import save_adapter
from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from jobs.caption import read_captions
from jobs.cli import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    model = FusedVLM(load_base("tiny"), CLIConfig(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16,
                                                  lora_rank=4, pool=2))
    perturb(model)
    save_adapter(model, folder)
    return str(folder)


def test_caption_folder_with_bad_files_and_resume(ray_local, tmp_path, adapter, capsys):
    folder = tmp_path / "imgs"
    write_images(folder, 5)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    args = ["caption", str(folder), "--adapter", adapter, "--out", str(tmp_path / "out"), "--batch-size", "2",
            "--max-new-tokens", "4"]
    assert main(args) == 0
    rows = read_captions(str(tmp_path / "out"))
    assert len(rows) == 6  # one row per input, the bad one included
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["source"].endswith("broken.png") and bad[0]["caption"] is None
    good = [r for r in rows if not r["error"]]
    assert all(r["completion_tokens"] >= 1 and r["prompt_tokens"] > 16 and isinstance(r["caption"], str) for r in good)
    assert {r["adapter"] for r in rows} == {"adapter0"}
    # resume: delete one shard, add one image; only the missing ones are captioned
    shard = sorted((tmp_path / "out").glob("part-*.parquet"))[0]
    lost = pq.read_table(shard).num_rows
    shard.unlink()
    write_images(tmp_path / "more", 1, seed=9)
    (tmp_path / "more" / "img000.png").rename(folder / "new.png")
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 6 - lost and summary["captioned"] + summary["failed"] == lost + 1
    rows = read_captions(str(tmp_path / "out"))
    assert sorted(r["source"] for r in rows) == sorted(str(p) for p in folder.iterdir())


@pytest.mark.slow
def test_caption_s3_jsonl_with_feature_cache(ray_local, tmp_path, adapter, bucket):
    s3 = boto3.client("s3")
    for p in write_images(tmp_path / "imgs", 3):
        s3.upload_file(str(p), bucket, f"imgs/{p.name}")
    assert main(["features", f"s3://{bucket}/imgs", "--out", f"s3://{bucket}/cache", "--base", "tiny",
                 "--layers", "0", "1", "2", "--pool", "2"]) == 0
    assert main(["caption", f"s3://{bucket}/imgs", "--adapter", adapter, "--out", f"s3://{bucket}/captions",
                 "--features", f"s3://{bucket}/cache", "--format", "jsonl", "--max-new-tokens", "4"]) == 0
    with_cache = sorted(read_captions(f"s3://{bucket}/captions"), key=lambda r: r["source"])
    assert len(with_cache) == 3 and all(r["error"] is None for r in with_cache)
    assert main(["caption", f"s3://{bucket}/imgs", "--adapter", adapter, "--out", f"s3://{bucket}/captions-pix",
                 "--max-new-tokens", "4"]) == 0
    by_pixels = sorted(read_captions(f"s3://{bucket}/captions-pix"), key=lambda r: r["source"])
    # float16 cache vs pixels: the same greedy captions on this tiny model
    assert [r["caption"] for r in with_cache] == [r["caption"] for r in by_pixels]


def test_caption_refuses_a_cache_for_other_layers(ray_local, tmp_path, adapter, capsys):
    write_images(tmp_path / "imgs", 2)
    assert main(["features", str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                 "--layers", "1", "2"]) == 0
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "imgs"), "--adapter", adapter, "--out", str(tmp_path / "out"),
                 "--features", str(tmp_path / "cache")]) == 2
    assert "layers: cache has [1, 2], the model needs [0, 1, 2] (missing [0])" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.slow
def test_caption_sampling_stop_and_dtype_from_the_command_line(ray_local, tmp_path, capsys):
    from benchmark_files import rigged_checkpoint

    ckpt = rigged_checkpoint(tmp_path / "says-x", "x", logit=12.0)  # p("x") > 0.999 at every step
    write_images(tmp_path / "imgs", 2)
    args = ["caption", str(tmp_path / "imgs"), "--base", str(ckpt), "--max-new-tokens", "6", "--temperature", "0.7",
            "--top-p", "0.9", "--seed", "1", "--dtype", "bfloat16", "--format", "jsonl"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert [(r["caption"], r["completion_tokens"]) for r in read_captions(str(tmp_path / "plain"))] == [("xxxxxx", 6)] * 2
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "stopped"), "--stop", "xxx", "--stop", "never"]) == 0
    out = capsys.readouterr().out
    # the caption ends before "xxx", and decoding stopped at the token that completed it
    assert [(r["caption"], r["completion_tokens"]) for r in read_captions(str(tmp_path / "stopped"))] == [("", 3)] * 2
    assert "1 actor(s) on cpu in bfloat16" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["dtypes_used"] == ["bfloat16"] and summary["compute"]["num_gpus"] == 0.0
