"""Where the model actors of `features`, `caption` and `eval` run (pipelines/compute.py): the device, dtype, actor
count and batch size chosen for GPU and CPU clusters; the Ray resources each job's model stage asks for (checked
on the lazy datasets, so a GPU cluster's requests are checked without a GPU); and CPU runs in bfloat16."""

from __future__ import annotations

import pytest
import ray
import torch
from test_features import write_images

from pipelines.compute import ComputeSpec, resolve_compute
from pipelines.feature_cache import CacheLookup

GPU_NODE = {"CPU": 64.0, "GPU": 8.0, "memory": 1e12}
CPU_NODE = {"CPU": 2.0, "memory": 8e9}


def test_gpus_get_one_actor_each_in_bfloat16_with_larger_batches():
    c = resolve_compute(ComputeSpec(), GPU_NODE, batch_cpu=8, batch_gpu=64)
    assert (c.device, c.dtype, c.concurrency, c.num_gpus, c.batch_size) == ("cuda", "bfloat16", 8, 1.0, 64)
    assert c.notes == "" and c.torch_dtype() is torch.bfloat16
    half = resolve_compute(ComputeSpec(gpus_per_actor=0.5), GPU_NODE, 8, 64)
    assert (half.concurrency, half.num_gpus) == (16, 0.5)  # two actors share each GPU
    two = resolve_compute(ComputeSpec(concurrency=2, dtype="float16", batch_size=32), GPU_NODE, 8, 64)
    assert (two.concurrency, two.dtype, two.batch_size) == (2, "float16", 32)
    over = resolve_compute(ComputeSpec(concurrency=12), GPU_NODE, 8, 64)
    assert "12 actors x 1.0 GPU exceed the cluster's 8 GPUs: 8 run at a time" in over.notes
    kwargs = c.map_kwargs()
    assert (kwargs["num_gpus"], kwargs["batch_size"], kwargs["compute"].min_size, kwargs["compute"].max_size) == (
        1.0, 64, 8, 8)


def test_cpu_clusters_stay_on_cpu_in_float32_unless_asked():
    c = resolve_compute(ComputeSpec(), CPU_NODE, batch_cpu=8, batch_gpu=64)
    assert (c.device, c.dtype, c.concurrency, c.num_gpus, c.batch_size) == ("cpu", "float32", 1, 0.0, 8)
    assert resolve_compute(ComputeSpec(dtype="bfloat16"), CPU_NODE, 8, 64).dtype == "bfloat16"
    waiting = resolve_compute(ComputeSpec(device="cuda"), CPU_NODE, 8, 64)  # an autoscaler may add GPU nodes
    assert (waiting.device, waiting.num_gpus, waiting.concurrency) == ("cuda", 1.0, 1)
    assert "the cluster has no GPU now" in waiting.notes


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "device='tpu' is not one of"),
    ({"dtype": "int8"}, "dtype='int8' is not one of"),
    ({"device": "cpu", "dtype": "float16"}, "float16 is not supported on cpu"),
    ({"gpus_per_actor": 0}, r"gpus_per_actor \(0\) must be in \(0, 8\]"),
    ({"concurrency": -1}, r"concurrency \(-1\)"),
])
def test_unsupported_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ComputeSpec(**kwargs)


@pytest.fixture
def model_stages(monkeypatch):
    """Every ``map_batches`` call of the driver, by the name of its function or class."""
    calls: dict[str, dict] = {}
    original = ray.data.Dataset.map_batches

    def spy(self, fn, **kwargs):
        calls[getattr(fn, "__name__", str(fn))] = kwargs
        return original(self, fn, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    return calls


def test_each_job_asks_ray_for_one_gpu_per_actor_on_a_gpu_cluster(ray_local, tmp_path, model_stages):
    """The datasets are lazy: what the model stage asks Ray for is checked without running it (no GPU here)."""
    from cli_module.loading import load_base
    from jobs.benchmarks import EvalItem
    from jobs.caption import CaptionJob, caption_dataset
    from jobs.evaluate import EvalJob, eval_dataset
    from pipelines.features import FeatureJob, features_dataset

    processor = load_base("tiny", weights=False).image_processor
    feat = FeatureJob(src=str(tmp_path), out=str(tmp_path / "cache"))
    compute = resolve_compute(feat.compute_spec(), {"CPU": 32.0, "GPU": 4.0}, 16, 128)
    features_dataset(feat, compute, ["a.png"], processor, set())
    cap = CaptionJob(src=str(tmp_path), out=str(tmp_path / "out"), base="tiny", gpus_per_actor=0.5)
    caption_dataset(cap, resolve_compute(cap.compute_spec(), {"CPU": 32.0, "GPU": 4.0}, 8, 64), ["a.png"], processor)
    ev = EvalJob(data="q.jsonl", base="tiny", concurrency=2)
    item = EvalItem(question_id=1, messages=[{"role": "user", "content": "<image>\nQ?"}], prompt="Q?", image="a.png")
    eval_dataset(ev, resolve_compute(ev.compute_spec(), {"CPU": 32.0, "GPU": 4.0}, 16, 64), [item], [[]], [""],
                 processor)

    encoder, captioner, answerer = model_stages["Encoder"], model_stages["Captioner"], model_stages["Answerer"]
    assert (encoder["num_gpus"], encoder["compute"].max_size, encoder["batch_size"]) == (1.0, 4, 128)
    assert encoder["fn_constructor_kwargs"]["compute"].dtype == "bfloat16"
    assert (captioner["num_gpus"], captioner["compute"].max_size, captioner["batch_size"]) == (0.5, 8, 64)
    assert (answerer["num_gpus"], answerer["compute"].max_size, answerer["batch_size"]) == (1.0, 2, 64)
    assert answerer["fn_constructor_kwargs"]["compute"].device == "cuda"
    # decoding stays on CPU tasks, fed in the model stage's batch size
    assert model_stages["decode_batch"].get("num_gpus") is None and model_stages["decode_batch"]["batch_size"] == 64
    assert model_stages["decode_images"]["batch_size"] == 64


def test_cpu_runs_ask_for_no_gpu_and_honour_bfloat16(ray_local, tmp_path, model_stages):
    from cli_module.loading import load_base
    from jobs.caption import CaptionJob, read_captions, run_caption
    from pipelines.features import FeatureJob, run_features

    write_images(tmp_path / "imgs", 3)
    caches = {}
    for dtype in ("float32", "bfloat16"):
        summary = run_features(FeatureJob(src=str(tmp_path / "imgs"), out=str(tmp_path / f"cache-{dtype}"),
                                          base="tiny", vision_layers=[1, 2], compute_dtype=dtype))
        assert summary["compute"]["device"] == "cpu" and summary["compute_dtypes_used"] == [dtype]
        assert model_stages["Encoder"]["num_gpus"] == 0.0 and model_stages["Encoder"]["batch_size"] == 16
        caches[dtype] = CacheLookup(str(tmp_path / f"cache-{dtype}"), load_base("tiny", weights=False), [1, 2], 1)
    ids = sorted(caches["float32"].rows)
    exact, bf16 = caches["float32"].features(ids), caches["bfloat16"].features(ids)
    assert not torch.equal(exact.layers, bf16.layers)  # really computed in bfloat16 ...
    torch.testing.assert_close(bf16.layers, exact.layers, atol=0.1, rtol=0.05)  # ... to bfloat16's precision

    summary = run_caption(CaptionJob(src=str(tmp_path / "imgs"), out=str(tmp_path / "captions"), base="tiny",
                                     dtype="bfloat16", max_new_tokens=3))
    assert summary["captioned"] == 3 and summary["dtypes_used"] == ["bfloat16"] and summary["devices_used"] == ["cpu"]
    assert model_stages["Captioner"]["num_gpus"] == 0.0 and model_stages["Captioner"]["compute"].max_size == 1
    assert all(isinstance(r["caption"], str) for r in read_captions(str(tmp_path / "captions")))
