"""Feature cache: Ray Data to Parquet on local disk and on a real S3 server (moto), bad files, resume, kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import perturb, random_images
from PIL import Image

from cli_module.config import CLIConfig
from cli_module.loading import load_base
from cli_module.model import FusedVLM
from jobs.cli import main
from pipelines.feature_cache import (
    CacheKey,
    batch_to_features,
    cache_key_for,
    load_cache_table,
    read_cache,
    read_cache_info,
    shard_uris,
    table_to_numpy,
)

LAYERS = ["0", "1", "2"]


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = random_images(1, seed * 1000 + i, size=(16 + i % 5, 20))[0]
        paths.append(folder / f"img{i:03d}.png")
        img.save(paths[-1])
    return paths


def features(*args: str) -> int:
    return main(["features", *args])


def test_local_folder_to_local_cache(ray_local, tmp_path, capsys):
    write_images(tmp_path / "imgs", 5)
    assert features(str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                    "--layers", *LAYERS, "--pool", "2", "--batch-size", "2") == 0
    assert "5 images encoded, 0 skipped" in capsys.readouterr().out
    info = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert info["rows"] == 5 and info["key"]["layers"] == [0, 1, 2] and info["key"]["pool"] == 2
    assert info["key"]["select_layer"] == 1 and info["key"]["base"] == "tiny"
    table = load_cache_table(str(tmp_path / "cache"))
    assert table.num_rows == 5 and len(set(table["image_id"].to_pylist())) == 5
    batch = table_to_numpy(table)
    assert batch["select"].shape == (5, 16, 32) and batch["select"].dtype == np.float16  # 4x4 grid, no CLS
    assert batch["layers"].shape == (5, 3, 4, 32)  # K=3, pooled 2x2 -> 4 tokens
    assert len(shard_uris(str(tmp_path / "cache"))) == 3  # batches of 2


@pytest.mark.slow
def test_s3_source_and_destination(ray_local, tmp_path, bucket):
    s3 = boto3.client("s3")
    for p in write_images(tmp_path / "imgs", 4, seed=1):
        s3.upload_file(str(p), bucket, f"raw/{p.name}")
    assert features(f"s3://{bucket}/raw", "--out", f"s3://{bucket}/cache", "--base", "tiny",
                    "--layers", *LAYERS, "--dtype", "bfloat16") == 0
    base = load_base("tiny")
    expect = cache_key_for(base, [0, 1, 2], 1, "bfloat16")
    ds = read_cache(f"s3://{bucket}/cache", expect)
    rows = ds.take_all()
    assert len(rows) == 4 and all(r["source"].startswith(f"s3://{bucket}/raw/") for r in rows)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="cache/")["Contents"]]
    assert "cache/cache.json" in keys and "cache/errors.parquet" in keys
    assert not any(k.rsplit("/", 1)[-1].startswith(".tmp-") for k in keys)


def test_bad_files_are_recorded_and_skipped(ray_local, tmp_path, capsys):
    folder = tmp_path / "imgs"
    good = write_images(folder, 5)
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    data = good[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("1", (400, 400)).save(folder / "bomb.png")  # tiny file, 160,000 pixels > the cap below
    assert features(str(folder), "--out", str(tmp_path / "cache"), "--base", "tiny", "--layers", *LAYERS,
                    "--max-pixels", "100000") == 0
    out = capsys.readouterr().out
    assert "5 images encoded" in out and "4 failed" in out
    assert load_cache_table(str(tmp_path / "cache")).num_rows == 5
    errors = {Path(r["source"]).name: r["reason"] for r in pq.read_table(tmp_path / "cache" / "errors.parquet").to_pylist()}
    assert set(errors) == {"zero.png", "notes.png", "truncated.png", "bomb.png"}
    assert "empty file" in errors["zero.png"]
    assert "not an image" in errors["notes.png"]
    assert "truncated" in errors["truncated.png"]
    assert "image is 400x400 = 160000 pixels, over the cap of 100000 (decompression-bomb guard)" in errors["bomb.png"]


def test_manifest_with_missing_file(ray_local, tmp_path):
    paths = write_images(tmp_path / "data" / "images", 3)
    records = [{"id": str(i), "image": f"images/{p.name}"} for i, p in enumerate(paths)]
    records.append({"id": "x", "image": "images/missing.png"})
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert features(str(tmp_path / "data" / "train.jsonl"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                    "--layers", *LAYERS) == 0
    assert load_cache_table(str(tmp_path / "cache")).num_rows == 3
    errors = pq.read_table(tmp_path / "cache" / "errors.parquet").to_pylist()
    assert len(errors) == 1 and errors[0]["source"].endswith("missing.png")


def test_resume_encodes_only_missing_images(ray_local, tmp_path, capsys):
    write_images(tmp_path / "imgs", 6)
    args = [str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"), "--base", "tiny", "--layers", *LAYERS,
            "--batch-size", "2"]
    assert features(*args) == 0
    before = load_cache_table(str(tmp_path / "cache"))
    shards = sorted((tmp_path / "cache").glob("part-*.parquet"))
    lost = pq.read_table(shards[0]).num_rows
    shards[0].unlink()
    capsys.readouterr()
    assert features(*args) == 0
    out = capsys.readouterr().out
    assert f"{lost} images encoded, {6 - lost} skipped" in out
    after = load_cache_table(str(tmp_path / "cache"))
    before, after = table_to_numpy(before), table_to_numpy(after)
    order_b, order_a = np.argsort(before["image_id"]), np.argsort(after["image_id"])
    np.testing.assert_array_equal(before["image_id"][order_b], after["image_id"][order_a])
    np.testing.assert_array_equal(before["layers"][order_b], after["layers"][order_a])


@pytest.mark.parametrize("dtype,atol", [("float16", 2e-3), pytest.param("bfloat16", 2e-2, marks=pytest.mark.slow),
                                        pytest.param("int8", 5e-2, marks=pytest.mark.slow)])
def test_cached_features_give_pixel_path_logits(ray_local, tmp_path, dtype, atol):
    """Tolerances on logits: float16 2e-3, bfloat16 2e-2, int8 (per-token scales) 5e-2; logits here span about +-0.3."""
    paths = write_images(tmp_path / "imgs", 3)
    assert features(str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                    "--layers", *LAYERS, "--pool", "2", "--dtype", dtype) == 0
    base = load_base("tiny")
    torch.manual_seed(0)  # the plug-in's random init would otherwise depend on which tests ran before
    model = FusedVLM(base, CLIConfig(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, lora_rank=4,
                                     pool=2))
    perturb(model)
    table = load_cache_table(str(tmp_path / "cache"), cache_key_for(base, [0, 1, 2], 2, dtype))
    by_source = {Path(s).name: i for i, s in enumerate(table["source"].to_pylist())}
    order = [by_source[p.name] for p in paths]
    batch = {c: v[order] for c, v in table_to_numpy(table).items()}
    feats = batch_to_features(batch, dtype)
    prompts = ["USER: <image>\nwhat? ASSISTANT:"] * 3
    inputs, visual = model.prepare_inputs(prompts, images=[Image.open(p) for p in paths])
    by_pixels = model(**inputs, visual=visual).logits
    _, visual_cached = model.prepare_inputs(prompts, features=feats)
    by_cache = model(**inputs, visual=visual_cached).logits
    assert (by_cache - by_pixels).abs().max() < atol
    # the cache holds the encoder's features rounded to its storage dtype: changed (so they really were stored in
    # it) by no more than that dtype's rounding (so not in a coarser one): float16 keeps 11 significant bits,
    # bfloat16 8, int8 a step of max|x| / 127 per token
    pixels = base.image_processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    exact = model.encode_images(pixels).select_features  # (3, N, Dv) float32
    err = (feats.select_features.float() - exact).abs()
    assert err.max() > 0
    if dtype == "int8":
        bound = exact.abs().amax(-1, keepdim=True) / 127 / 2
    else:
        bound = exact.abs() * {"float16": 2**-11, "bfloat16": 2**-8}[dtype]
    assert (err <= bound * 1.01 + 1e-6).all(), float((err - bound).max())


def test_reader_refuses_a_different_key(ray_local, tmp_path):
    write_images(tmp_path / "imgs", 2)
    assert features(str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                    "--layers", *LAYERS) == 0
    base = load_base("tiny")
    with pytest.raises(ValueError, match=r"layers: cache has \[0, 1, 2\], expected \[1, 2\]"):
        read_cache_info(str(tmp_path / "cache"), cache_key_for(base, [1, 2], 1, "float16"))
    other = CacheKey(**{**read_cache_info(str(tmp_path / "cache"))["key"], "base": "small"})
    with pytest.raises(ValueError, match="base: cache has 'tiny', expected 'small'"):
        read_cache_info(str(tmp_path / "cache"), other)


def test_early_errors_are_one_line_before_any_work(ray_local, tmp_path, s3_server, capsys):
    cases = [
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "c1")], "no such file or folder"),
        ([str(tmp_path / "empty"), "--out", str(tmp_path / "c2")], "no files found"),
        (["s3://no-such-bucket-xyz/imgs", "--out", str(tmp_path / "c3")], "does not exist"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        assert features(*args, "--base", "tiny") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not Path(args[2]).exists()  # nothing written


def test_wrong_credentials_fail_early(tmp_path):
    """A second moto server with IAM auth on: made-up keys are rejected before any work."""
    from conftest import free_port

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        cmd = [str(Path(sys.executable).parent / "crosslayer"), "features", "s3://some-bucket/imgs",
               "--out", str(tmp_path / "c"), "--base", "tiny"]
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "wrong",
               "AWS_SECRET_ACCESS_KEY": "wrong"}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        last = res.stderr.strip().splitlines()[-1]
        assert "crosslayer features: error: s3://some-bucket/imgs: access denied" in last
        assert "credentials" in last or "denied" in last.lower() or "InvalidAccessKeyId" in last, last
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_killed_run_leaves_no_partial_shard_and_rerun_completes(tmp_path):
    """SIGKILL the whole process group once the first shard is visible; the rerun finishes the cache."""
    n = 24
    write_images(tmp_path / "imgs", n)
    cache = tmp_path / "cache"
    cmd = [str(Path(sys.executable).parent / "crosslayer"), "features", str(tmp_path / "imgs"), "--out", str(cache),
           "--base", "tiny", "--layers", *LAYERS, "--batch-size", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", f"features .* {cache}"], check=False)  # its Ray workers
    shards = list(cache.glob("part-*.parquet"))
    assert shards, "no shard was written before the deadline"
    for s in shards:
        assert pq.read_table(s).num_rows == 1  # every visible shard is whole
    assert not (cache / "cache.json").exists()  # the run did not finish
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["rows"] == n and summary["skipped"] >= len(shards) and summary["done"] == n - summary["skipped"]
    assert not list(cache.glob(".tmp-*"))
    assert load_cache_table(str(cache)).num_rows == n


def test_cache_serves_models_that_need_a_subset_of_its_layers(ray_local, tmp_path):
    write_images(tmp_path / "imgs", 2)
    assert features(str(tmp_path / "imgs"), "--out", str(tmp_path / "cache"), "--base", "tiny",
                    "--layers", "2", "0", "1") == 0
    from pipelines.feature_cache import check_serves

    base = load_base("tiny")
    _, index = check_serves(str(tmp_path / "cache"), base, [1, 2], 1)
    assert index == [2, 0]  # positions of the model's layers in the cache's order
    assert check_serves(str(tmp_path / "cache"), base, [], 1)[1] == []  # one_to_one needs only `select`
    with pytest.raises(ValueError, match="pool: cache has 1, the model needs 2"):
        check_serves(str(tmp_path / "cache"), base, [1], 2)
    with pytest.raises(ValueError, match=r"vision layer 7 is out of range for an encoder with 2 layers: use hidden_states indices -3\.\.2"):
        check_serves(str(tmp_path / "cache"), base, [7], 1)
    table = table_to_numpy(load_cache_table(str(tmp_path / "cache")))
    feats = batch_to_features(table, "float16", index)
    np.testing.assert_array_equal(feats.layers[:, 0].numpy(), table["layers"][:, 2].astype(np.float32))
