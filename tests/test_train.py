"""crosslayer train: config checks, data checks before training, and real Ray Train + DeepSpeed runs (2 CPU
workers, tiny base) on a learnable data set: 32 noisy 16x16 images whose answer is their dominant colour.

One reference run (ZeRO-2, 30 steps, checkpoints every 10) is shared: it must learn, its adapter must load and
reproduce its final eval loss, and a run that crashes after its second checkpoint and is resumed by name, or
loses a worker to SIGKILL mid-run (slow), must end with the same adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_images

from cli_module.config import CLIConfig
from cli_module.model import FusedVLM
from jobs.train_config import TrainConfig, deepspeed_config, load_config, lr_factor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS, EVERY = 30, 10


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colour_data(tmp_path_factory, ray_local):
    """images/, train.jsonl (24), eval.jsonl (8), and a float16 feature cache of layers [1, 2]."""
    from pipelines.features import FeatureJob, run_features

    root = tmp_path_factory.mktemp("colours")
    records = [{"id": f"c{i}", "image": f"images/{i:02d}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this image?"}, {"from": "gpt", "value": name}]}
        for i, name in enumerate(colour_images(root / "images", 32))]
    write_jsonl(root / "train.jsonl", records[:24])
    write_jsonl(root / "eval.jsonl", records[24:])
    run_features(FeatureJob(src=str(root / "images"), out=str(root / "cache"), base="tiny", vision_layers=[1, 2],
                            pool=1, dtype="float16", batch_size=16))
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={data}/train.jsonl", f"data.eval={data}/eval.jsonl", f"data.features={data}/cache",
            f"output_dir={out}", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4", "trainer.log_every=1",
            f"trainer.eval_every={EVERY}", f"trainer.checkpoint_every={EVERY}", "trainer.num_to_keep=3",
            "trainer.max_failures=0", "trainer.poll_interval_s=0.25", "optim.lr=1e-2", "optim.warmup_steps=2",
            *extra]


def adapter_state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-4) -> None:
    sa, sb = adapter_state(a), adapter_state(b)
    assert sorted(sa) == sorted(sb)
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= atol, f"adapters differ by {worst}"


@pytest.fixture(scope="module")
def reference(colour_data, tmp_path_factory):
    """The uninterrupted ZeRO-2 run the other runs are compared with."""
    from jobs.train import run_train

    out = tmp_path_factory.mktemp("reference")
    summary = run_train(load_config(CONFIG, overrides(colour_data, out, "trainer.run_name=reference")))
    return out, summary


# --- config ---------------------------------------------------------------------------------------------

def test_config_overrides_and_typed_sections():
    cfg = load_config(CONFIG, ["trainer.max_steps=7", "cli.lora_rank=8", "method=deepstack", "optim.lr=1e-4",
                               "data.eval=null", "trainer.run_name=123", "deepspeed.zero_stage=3"])
    assert cfg.trainer.max_steps == 7 and cfg.cli.lora_rank == 8 and cfg.optim.lr == 1e-4
    assert cfg.method == cfg.cli.method == "deepstack"  # the plug-in's config carries the run's method
    assert cfg.data.eval is None and cfg.trainer.run_name == "123" and cfg.deepspeed.zero_stage == 3
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("items, message", [
    (["trainer.max_step=3"], "unknown config key 'trainer.max_step'; valid keys under 'trainer' are"),
    (["cli.lora_rnak=3"], "unknown config key 'cli.lora_rnak'"),
    (["optimizer.lr=1"], "unknown config key 'optimizer'; valid keys at the top level are"),
    (["trainer.max_steps=ten"], "trainer.max_steps must be an integer, got 'ten'"),
    (["trainer.max_steps=0"], "trainer.max_steps must be >= 1, got 0"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be 0, 1, 2 or 3, got 4"),
    (["deepspeed.precision=fp8"], "deepspeed.precision='fp8' is not one of"),
    (["optim.warmup_steps=50", "trainer.max_steps=10"], "optim.warmup_steps (50) exceeds trainer.max_steps (10)"),
    (["data.eval_fraction=1.5"], "data.eval_fraction must be in [0, 1), got 1.5"),
    (["method=lora"], "method='lora' is not one of"),
    (["cli.method=deepstack"], "cli.method='deepstack': a recipe sets the method once, at the top level"),
    (["trainer.max_steps"], "is not key=value"),
    (["trainer.max_steps=null"], "trainer.max_steps cannot be null: it has no unset value"),
    (["data.max_length=abc"], "data.max_length must be an integer, got 'abc' (or null, which unsets it)"),
    (["trainer.eval_batch_size=~"], "trainer.eval_batch_size cannot be null"),
])
def test_config_errors_name_the_key(items, message):
    with pytest.raises(ValueError) as err:
        load_config(CONFIG, items)
    assert message in str(err.value)


def test_null_unsets_an_optional_field(tmp_path):
    """``null`` (or ``~``) unsets an optional field, from the command line and in YAML alike."""
    cfg = load_config(CONFIG, ["data.features=/some/cache", "data.max_length=64"])
    assert cfg.data.features == "/some/cache" and cfg.data.max_length == 64
    unset = load_config(CONFIG, ["data.features=/some/cache", "data.features=null", "data.max_length=~"])
    assert unset.data.features is None and unset.data.max_length is None
    path = tmp_path / "recipe.yaml"
    path.write_text(CONFIG.read_text() + "\n")
    import yaml

    data = yaml.safe_load(path.read_text())
    data.setdefault("data", {})["features"] = None
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).data.features is None


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG.read_text().replace("  seed: 0", "  sed: 0"))
    with pytest.raises(ValueError, match=r"unknown config key 'trainer.sed'; valid keys .*'seed'"):
        load_config(path)


def test_shipped_configs_load():
    for name in ("tiny.yaml", "small-stage1.yaml", "small-stage2.yaml"):
        path = CONFIG.parent / name
        assert path.read_text().startswith("# crosslayer train --config configs/" + name)
        load_config(path)
    assert load_config(CONFIG.parent / "small-stage1.yaml").method == "projector_ft"
    assert load_config(CONFIG.parent / "small-stage2.yaml").init_projector


def test_deepspeed_config_is_explicit():
    cfg = load_config(CONFIG, ["trainer.micro_batch_size=3", "trainer.grad_accum=5", "deepspeed.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 3 * 5 * 2 and ds["gradient_accumulation_steps"] == 5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(ds) and "optimizer" not in ds
    o = load_config(CONFIG, ["optim.warmup_steps=4", "trainer.max_steps=20", "optim.min_lr_ratio=0.1"]).optim
    factors = [lr_factor(s, o, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0
    assert min(factors) >= 0.1 and factors[-1] == pytest.approx(0.1, abs=0.01)


def test_gate_and_output_learning_rates_are_their_own_groups():
    """optim.gate_lr_scale / out_lr_scale: AdamW's first step moves each parameter by about its group's lr."""
    from cli_module.loading import load_base
    from jobs.train_loop import build_model, param_groups

    cfg = load_config(CONFIG, ["optim.lr=1e-3", "optim.gate_lr_scale=10", "optim.out_lr_scale=0.1"])
    model = build_model(load_base("tiny"), cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    assert {k: g["lr"] for k, g in groups.items()} == pytest.approx({"rest": 1e-3, "gate": 1e-2, "out": 1e-4})
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)].split(".", 2)[-1] for p in groups["gate"]["params"]} == {"gate_bias", "gate_proj.weight",
                                                                                   "gate_proj.bias"}
    assert all(named[id(p)].endswith("out_proj.weight") for p in groups["out"]["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(groups.values()), lr=cfg.optim.lr, weight_decay=0.0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    assert moved["agf.0.gate_bias"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["agf.0.out_proj.weight"] == pytest.approx(1e-4, rel=1e-3)
    assert moved["agf.0.q_proj.weight"] == pytest.approx(1e-3, rel=1e-3)

    no_gates = load_config(CONFIG, ["cli.gate=none", "optim.gate_lr_scale=2"])
    with pytest.raises(ValueError, match="optim.gate_lr_scale=2.0 but this model trains no AGF gate"):
        param_groups(build_model(load_base("tiny"), no_gates), no_gates.optim)
    with pytest.raises(ValueError, match=r"optim.gate_lr_scale \(0.0\), optim.out_lr_scale \(1.0\) and optim.lm_lr_scale \(1.0\) must be > 0"):
        load_config(CONFIG, ["optim.gate_lr_scale=0"])


# --- bad input: found before any worker starts ----------------------------------------------------------

def test_bad_rows_fail_before_training_or_are_skipped(colour_data, tmp_path):
    from jobs.train import setup

    good = [json.loads(x) for x in (colour_data / "train.jsonl").read_text().splitlines()]
    missing = {**good[0], "id": "missing", "image": "images/not-cached.png"}
    no_image = {**good[1], "id": "noimage", "conversations": [{"from": "human", "value": "What colour?"},
                                                               {"from": "gpt", "value": "red"}]}
    train = write_jsonl(colour_data / "bad-train.jsonl", [*good, missing, no_image])
    base = overrides(colour_data, tmp_path / "out", f"data.train={train}")
    with pytest.raises(ValueError) as err:
        setup(load_config(CONFIG, base))
    text = str(err.value)
    assert "2 unusable row(s)" in text and "data.skip_bad_rows=true" in text
    assert "image not in the feature cache: 1 row(s)" in text and "not-cached.png" in text and "'missing'" in text
    assert "bad <image> placeholder: 1 row(s)" in text and "found 0" in text

    s = setup(load_config(CONFIG, [*base, "data.skip_bad_rows=true"]))
    assert s.data.skipped == {"image not in the feature cache": 1, "bad <image> placeholder": 1}
    assert len(s.data.train) == 24 and s.data.rows_read["train"] == 26


def test_too_long_sequences(colour_data, tmp_path):
    from jobs.train import setup

    # 20 tokens would cut every row's 16 image tokens: each row is dropped and counted, none trains
    with pytest.raises(ValueError, match=r"^0 usable training examples"):
        setup(load_config(CONFIG, overrides(colour_data, tmp_path, "data.max_length=20")))
    with pytest.raises(ValueError, match="exceeds the model's limit of 512"):
        setup(load_config(CONFIG, overrides(colour_data, tmp_path, "data.max_length=4096")))
    assert setup(load_config(CONFIG, overrides(colour_data, tmp_path))).data.max_length == 512


def test_cache_of_another_base_or_layers(colour_data, tmp_path):
    from jobs.train import setup

    other = tmp_path / "cache"
    shutil.copytree(colour_data / "cache", other)
    info = json.loads((other / "cache.json").read_text())
    info["key"]["base"] = "tiny-onevision"
    (other / "cache.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"does not match this model: base: cache has 'tiny-onevision', "
                                         r"expected 'tiny'.*--base tiny"):
        setup(load_config(CONFIG, overrides(colour_data, tmp_path, f"data.features={other}")))
    with pytest.raises(ValueError, match=r"layers: cache has \[1, 2\], the model needs \[0, 2\] \(missing \[0\]\)"):
        setup(load_config(CONFIG, overrides(colour_data, tmp_path, "cli.vision_layers=[0,2]")))
    # a cache of more layers serves a method that needs fewer (or none)
    assert setup(load_config(CONFIG, overrides(colour_data, tmp_path, "cli.vision_layers=[2]"))).data.cache.layer_index == [1]
    assert setup(load_config(CONFIG, overrides(colour_data, tmp_path, "method=projector_ft"))).data.cache.layer_index is None


# --- training runs --------------------------------------------------------------------------------------

def evaluate_adapter(adapter_dir: Path, cfg: TrainConfig) -> dict[str, float]:
    """Eval loss of a saved adapter on the eval split, outside Ray: the same cached rows and the same sums."""
    from cli_module.adapter import load_adapter
    from jobs.train import setup
    from jobs.train_loop import eval_metrics, eval_sums
    from jobs.train_stream import local_loader

    s = setup(cfg)
    model = load_adapter(adapter_dir).eval()
    data = local_loader(s.data, "eval", s.pad_id)
    return eval_metrics(eval_sums(model, data, batch_size=8, num_batches=-(-len(data) // 8)))


def test_zero2_two_workers_learns_and_adapter_reproduces_eval(reference, colour_data):
    out, summary = reference
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    # the tiny base's frozen random LM head bounds how far the loss can fall (logits span about +-0.6), so the
    # drop is small in nats but the answers' argmax accuracy rises from 0
    assert np.mean([r["loss"] for r in train[-5:]]) < train[0]["loss"] - 0.15, [r["loss"] for r in train]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.15
    # the AGF gates over training: (injection layers x vision layers) means at the answer positions, in (0, 1)
    cfg = load_config(CONFIG, overrides(colour_data, out))
    shape = (len(cfg.cli.inject_layers), len(cfg.cli.vision_layers))
    assert all(np.asarray(r["eval_gates"]).shape == shape for r in evals)
    assert all(0 < g < 1 for r in evals for row in r["eval_gates"] for g in row)
    assert np.abs(np.asarray(evals[-1]["eval_gates"]) - np.asarray(evals[0]["eval_gates"])).max() > 1e-3
    assert evals[0]["eval_token_acc"] < 0.1 and evals[-1]["eval_token_acc"] > 0.25
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and summary["steps"] == STEPS

    got = evaluate_adapter(out / "adapter", cfg)
    assert got["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert got["eval_token_acc"] == pytest.approx(summary["eval_token_acc"], abs=1e-6)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "cli" and config["train_step"] == STEPS and config["run_name"] == "reference"
    assert float(adapter_state(out / "adapter")["agf.0.out_proj.weight"].abs().max()) > 0
    kept = sorted(p.name for p in (out / "runs" / "reference").glob("checkpoint_0*"))
    assert kept == ["checkpoint_000010", "checkpoint_000020", "checkpoint_000030"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, method", [(0, "deepstack"), (3, "cli"), (3, "projector_ft"), (3, "llm_lora")])
def test_zero_stages_and_baselines_save_loadable_adapters(stage, method, colour_data, tmp_path):
    from cli_module.adapter import load_adapter
    from cli_module.loading import load_base
    from jobs.train import run_train
    from jobs.train_loop import build_model

    scales = ["optim.gate_lr_scale=4", "optim.out_lr_scale=2"] if method == "cli" else []  # DeepSpeed's groups
    cfg = load_config(CONFIG, overrides(colour_data, tmp_path, f"deepspeed.zero_stage={stage}", f"method={method}",
                                        "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=0",
                                        *scales))
    summary = run_train(cfg)
    assert summary["steps"] == 4 and np.isfinite(summary["loss"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ("eval_gates" in rows[-1]) == (method == "cli")
    model = load_adapter(tmp_path / "adapter")
    assert model.config.method == method and model.projector_modified == (method == "projector_ft")
    trained, untrained = adapter_state(tmp_path / "adapter"), build_model(load_base("tiny"), cfg).adapter_state_dict()
    assert sorted(trained) == sorted(untrained)
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)  # the step moved the weights
    assert evaluate_adapter(tmp_path / "adapter", cfg)["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)


def test_init_projector_takes_stage1_projector(tmp_path):
    from conftest import perturb

    from cli_module.adapter import save_adapter
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from jobs.train_loop import build_model

    stage1 = FusedVLM(load_base("tiny"), CLIConfig(method="projector_ft"))
    perturb(stage1)
    save_adapter(stage1, tmp_path / "stage1")
    cfg = load_config(CONFIG, [f"init_projector={tmp_path / 'stage1'}"])
    stage2 = build_model(load_base("tiny"), cfg)
    assert stage2.projector_modified and cfg.method == "cli"
    state = stage2.adapter_state_dict()
    for name, p in stage1.base.projector.named_parameters():
        assert torch.equal(state[f"projector.{name}"], p.detach())
    assert not any(p.requires_grad for p in stage2.base.projector.parameters())  # stage 2 keeps P frozen
    stage2.projector_modified = False
    save_adapter(stage2, tmp_path / "no-projector")
    with pytest.raises(ValueError, match="holds no projector.* weights"):
        build_model(load_base("tiny"), load_config(CONFIG, [f"init_projector={tmp_path / 'no-projector'}"]))


@pytest.mark.slow
def test_instruct_writes_a_derived_base_that_stage_2_trains_on(colour_data, tmp_path):
    """LLaVA's visual instruction tuning (P + LLM, ZeRO-2, two workers) -> model/, a base that loads by its folder,
    reproduces the run's eval loss, reads the source's feature cache, and takes a CLI run on top."""
    from cli_module.loading import load_base
    from jobs.train import run_train, setup
    from jobs.train_loop import eval_metrics, eval_sums
    from jobs.train_stream import local_loader

    cfg = load_config(CONFIG, overrides(colour_data, tmp_path / "instruct", "method=instruct", "optim.lm_lr_scale=0.5",
                                        "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=0"))
    summary = run_train(cfg)
    model_dir = tmp_path / "instruct" / "model"
    assert summary["adapter"] is None and summary["base"] == str(model_dir)
    assert not (tmp_path / "instruct" / "adapter").exists()
    derived, source = load_base(str(model_dir)), load_base("tiny")
    moved = [not torch.equal(p, q) for p, q in zip(derived.language_model.parameters(),
                                                   source.language_model.parameters())]
    assert any(moved) and not any(not torch.equal(p, q) for p, q in zip(derived.vision_tower.parameters(),
                                                                           source.vision_tower.parameters()))
    s = setup(cfg)
    fused = FusedVLM(derived, CLIConfig(method="one_to_one")).eval()
    data = local_loader(s.data, "eval", s.pad_id)
    got = eval_metrics(eval_sums(fused, data, batch_size=8, num_batches=-(-len(data) // 8)))["eval_loss"]
    assert got == pytest.approx(summary["eval_loss"], abs=1e-3)  # the saved weights are the trained ones

    stage2 = load_config(CONFIG, overrides(colour_data, tmp_path / "cli", f"base={model_dir}", "trainer.max_steps=2",
                                           "trainer.eval_every=2", "trainer.checkpoint_every=0"))
    second = run_train(stage2)  # the cache built for tiny feeds it: the encoder is tiny's
    config = json.loads((tmp_path / "cli" / "adapter" / "adapter_config.json").read_text())
    assert second["steps"] == 2 and config["base_model"] == str(model_dir)
    with pytest.raises(ValueError, match="optim.lm_lr_scale=0.5 but this model trains no LLM parameters"):
        setup(load_config(CONFIG, overrides(colour_data, tmp_path / "x", "optim.lm_lr_scale=0.5")))


def test_method_without_trainable_parameters(colour_data, tmp_path):
    from jobs.train import setup

    with pytest.raises(ValueError, match="method 'one_to_one' has no trainable parameters"):
        setup(load_config(CONFIG, overrides(colour_data, tmp_path, "method=one_to_one")))


@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_run(reference, colour_data, tmp_path, monkeypatch):
    from ray.train import TrainingFailedError

    from jobs.train import run_train

    args = overrides(colour_data, tmp_path, "trainer.run_name=crashy")
    monkeypatch.setenv("CROSSLAYER_FAULTS", json.dumps({"crash_at_step": 25}))
    with pytest.raises(TrainingFailedError, match="crash_at_step=25"):
        run_train(load_config(CONFIG, args))
    monkeypatch.delenv("CROSSLAYER_FAULTS")
    runs = tmp_path / "runs" / "crashy"
    assert sorted(p.name for p in runs.glob("checkpoint_0*")) == ["checkpoint_000010", "checkpoint_000020"]
    assert not (tmp_path / "adapter").exists()

    summary = run_train(load_config(CONFIG, args))  # same name, same storage: resumes from step 20
    assert summary["steps"] == STEPS
    assert_same_adapter(tmp_path / "adapter", reference[0] / "adapter")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert summary["eval_loss"] == pytest.approx(reference[1]["eval_loss"], abs=1e-4)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint(reference, colour_data, tmp_path, monkeypatch):
    from jobs.train import run_train

    pids = tmp_path / "pids"
    monkeypatch.setenv("CROSSLAYER_FAULTS", json.dumps({"pid_dir": str(pids), "step_sleep_s": 0.15}))
    cfg = load_config(CONFIG, overrides(colour_data, tmp_path, "trainer.run_name=killed", "trainer.max_failures=1"))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_train(cfg)), daemon=True)
    thread.start()
    second = tmp_path / "runs" / "killed" / "checkpoint_000020"
    deadline = time.time() + 240
    while not (second / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert second.exists(), "the run never wrote its second checkpoint"
    victim = int((pids / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert "summary" in result, "the run did not finish after losing a worker"
    assert int((pids / "rank1.pid").read_text()) != victim  # a new worker group ran
    assert_same_adapter(tmp_path / "adapter", reference[0] / "adapter")


@pytest.mark.slow
def test_checkpoints_and_outputs_on_s3(colour_data, bucket):
    import boto3

    from jobs.train import run_train
    from pipelines import storage

    out, cache = f"s3://{bucket}/train", f"s3://{bucket}/cache"
    for f in (colour_data / "cache").iterdir():  # the feature cache on S3 too: workers stream it from there
        boto3.client("s3").upload_file(str(f), bucket, f"cache/{f.name}")
    cfg = load_config(CONFIG, overrides(colour_data, Path("unused"), f"output_dir={out}", "trainer.run_name=s3run",
                                        f"data.features={cache}",
                                        "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.num_to_keep=1",
                                        "trainer.eval_every=4"))
    summary = run_train(cfg)
    assert summary["storage_path"] == f"{out}/runs" and summary["checkpoint"].endswith("s3run/checkpoint_000004")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"train/adapter/adapter_model.safetensors", "train/metrics.jsonl", "train/loss.png"} <= keys
    assert not any("checkpoint_000002/" in k for k in keys)  # num_to_keep=1
    rows = [json.loads(x) for x in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert rows[-1]["step"] == 4 and "eval_loss" in rows[-1]
