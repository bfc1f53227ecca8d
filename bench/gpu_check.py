"""CUDA-path checks, for a machine with a GPU (run by hand or unattended; prints one JSON line, exits 1 when a
check fails, 2 without CUDA).

Model (``--only model``):
- bf16 on CUDA: an untrained CLI plug-in gives exactly the base's logits (LLaVA-1.5 and LLaVA-OneVision tiny);
- fp32 on CUDA: cached generation equals an uncached greedy loop, token for token, with non-zero plug-in weights;
- bf16 on CUDA: cached vs uncached greedy tokens (reported: bf16 kernels differ by shape, so ties may flip);
- the features path equals the pixel path on CUDA (max |logit difference|).

Jobs (``--only jobs``; needs Ray): `features`, `caption` and `eval` through a local Ray cluster that owns the
machine's GPUs, with their defaults (``--device auto``: GPU actors in bfloat16, one per GPU), on tiny llava-hf
checkpoints in the hub's layout (tests/hub_checkpoints.py, tests/benchmark_files.py):
- each job's actors ran on cuda in bfloat16 (what the actors report) and asked Ray for one GPU each;
- the feature cache encoded on the GPU in bf16 vs on the CPU in fp32 (max |difference|);
- eval on a VQAv2-layout question file + annotations with a checkpoint whose answers are known by hand: soft
  accuracy 0.475 on the GPU as on the CPU; likelihood scoring picks the same answers, log-probabilities compared;
- throughput figures (images / questions per second) of the tiny models: a smoke figure, not a benchmark.
``--device cpu`` runs the job checks on the CPU (a dry run of this script where there is no GPU).

    python bench/gpu_check.py                 # both
    python bench/gpu_check.py --only jobs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def perturb(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p.device, p.dtype))


def images(n: int, size=(16, 16)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def model_checks(out: dict) -> list[bool]:
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from cli_module.prompting import chat_prompt
    from pipelines.generation import Sampling, complete

    cfg = dict(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4)
    for name in ("tiny", "tiny-onevision"):
        base = load_base(name, dtype=torch.bfloat16)
        base.model.cuda()
        model = FusedVLM(base, CLIConfig(**cfg)).cuda().to(torch.bfloat16)
        prompts = [chat_prompt(base.tokenizer, "what is it?")]
        imgs = images(1, (30, 20) if name == "tiny-onevision" else (16, 16))
        inputs, visual = model.prepare_inputs(prompts, images=imgs, anyres=True)  # all crops, as the hub model
        proc = base.image_processor(images=imgs, return_tensors="pt")
        extra = {"image_sizes": proc["image_sizes"].cuda()} if "image_sizes" in proc else {}
        with torch.no_grad():
            ref = base.model(**inputs, pixel_values=proc["pixel_values"].cuda().to(torch.bfloat16), **extra).logits
            fused = model(**inputs, visual=visual).logits
        out[f"{name}_bf16_zero_init_equal"] = bool(torch.equal(ref, fused))
        out[f"{name}_bf16_zero_init_max_diff"] = float((ref.float() - fused.float()).abs().max())

    for dtype in (torch.float32, torch.bfloat16):
        base = load_base("tiny", dtype=dtype)
        base.model.cuda()
        model = FusedVLM(base, CLIConfig(**cfg)).cuda().to(dtype)
        perturb(model)
        prompts = [chat_prompt(base.tokenizer, "what is it" + "?" * i) for i in range(2)]
        inputs, visual = model.prepare_inputs(prompts, images=images(2))
        cached = [c.text for c in complete(model, inputs, visual, Sampling(max_new_tokens=12))]  # the engine
        ids, mask, steps = inputs["input_ids"], inputs["attention_mask"], []
        with torch.no_grad():  # a plain greedy loop of full forwards, no cache
            for _ in range(12):
                logits = model(ids, mask, visual=visual).logits[:, -1].float()
                logits[:, base.image_token_id] = float("-inf")
                steps.append(logits.argmax(-1))
                ids = torch.cat([ids, steps[-1][:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(steps[-1])[:, None]], 1)
        eos, uncached = base.tokenizer.eos_token_id, []
        for row in torch.stack(steps, 1).tolist():
            row = row[: row.index(eos)] if eos in row else row
            uncached.append(base.tokenizer.decode(row, skip_special_tokens=True).strip())
        key = "fp32" if dtype == torch.float32 else "bf16"
        out[f"{key}_cached_equals_uncached"] = cached == uncached
        if dtype == torch.float32:
            pixels = base.image_processor(images=images(2), return_tensors="pt")["pixel_values"].cuda()
            feats = model.encode_images(pixels)
            with torch.no_grad():
                a = model(**inputs, pixel_values=pixels).logits
                b = model(**inputs, features=feats).logits
            out["fp32_features_vs_pixels_max_diff"] = float((a - b).abs().max())
    return [out["tiny_bf16_zero_init_equal"], out["tiny-onevision_bf16_zero_init_equal"],
            out["fp32_cached_equals_uncached"]]


VQAV2 = [(1001, 1, "How many dogs are there?", "number", ["2", "2"] + ["3"] * 8),  # "2" scores 0.6
         (1002, 2, "How many cats are there?", "number", ["two"] * 4 + ["3"] * 6),  # 1.0
         (1003, 1, "What color is the car?", "other", ["red"] * 10),  # 0
         (1004, 3, "Is it sunny?", "yes/no", ["yes"] * 9 + ["2"])]  # 0.3: 0.475 in all


def job_checks(out: dict, device: str, n_images: int = 64) -> list[bool]:
    """features, caption and eval as users run them, with ``device`` ("auto" on a GPU machine) against cpu."""
    try:
        import ray
    except ImportError:
        out["jobs"] = "skipped: ray is not installed here (pip install 'ray[data]')"
        return []
    sys.path.insert(0, str(ROOT / "tests"))
    import logging

    from benchmark_files import rigged_checkpoint, vqav2_files, write_coco_images
    from hub_checkpoints import save_tiny_checkpoint

    from cli_module.loading import load_base
    from jobs.caption import CaptionJob, run_caption
    from jobs.evaluate import EvalJob, run_eval
    from pipelines.feature_cache import CacheLookup
    from pipelines.features import FeatureJob, run_features

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the JSON line is the output
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ray.init(configure_logging=False, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    want = "cuda" if device in ("auto", "cuda") else "cpu"
    jobs: dict = {"cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}
    checks: list[bool] = []
    ckpt = str(save_tiny_checkpoint(work / "llava-tiny-hf", "llava"))
    says_2 = str(rigged_checkpoint(work / "llava-says-2", "2", 3.0))
    write_coco_images(work / "images", list(range(n_images)))

    def ran_on(summary: dict, used: str) -> bool:
        """The actors ran where and in what the job chose (cuda: bfloat16, one GPU each; cpu: float32)."""
        c = summary["compute"]
        ok = summary[used] == ([c["dtype"]] if used.endswith("dtypes_used") else [want]) and c["device"] == want
        ok = ok and c["dtype"] == ("bfloat16" if want == "cuda" else "float32")
        return ok and (c["num_gpus"] >= 1.0 if want == "cuda" else c["num_gpus"] == 0.0)

    caches = {}
    for dev in dict.fromkeys((device, "cpu")):
        t = time.time()
        s = run_features(FeatureJob(src=str(work / "images"), out=str(work / f"cache-{dev}"), base=ckpt,
                                    vision_layers=[1, 2], device=dev))
        jobs[f"features_{dev}"] = {"compute": s["compute"], "devices_used": s["devices_used"],
                                   "compute_dtypes_used": s["compute_dtypes_used"], "done": s["done"],
                                   "img_per_s": round(s["done"] / (time.time() - t), 1)}
        caches[dev] = CacheLookup(str(work / f"cache-{dev}"), load_base(ckpt, weights=False), [1, 2], 1)
        if dev == device:
            checks += [ran_on(s, "devices_used"), ran_on(s, "compute_dtypes_used"), s["done"] == n_images]
    ids = sorted(caches["cpu"].rows)
    diff = (caches[device].features(ids).layers - caches["cpu"].features(ids).layers).abs().max()
    jobs["features_device_vs_cpu_fp32_max_diff"] = float(diff)
    checks.append(float(diff) < 0.1)

    t = time.time()
    s = run_caption(CaptionJob(src=str(work / "images"), out=str(work / "captions"), base=ckpt, device=device,
                               max_new_tokens=16))
    jobs["caption"] = {"compute": s["compute"], "devices_used": s["devices_used"], "dtypes_used": s["dtypes_used"],
                       "captioned": s["captioned"], "img_per_s": round(s["captioned"] / (time.time() - t), 1)}
    checks += [ran_on(s, "devices_used"), ran_on(s, "dtypes_used"), s["captioned"] == n_images]

    qfile, annotations, images = vqav2_files(work, VQAV2)
    reports = {}
    for dev in dict.fromkeys((device, "cpu")):
        eval_cache = str(work / f"cache-eval-{dev}")  # the questions' images, encoded by the answering base
        run_features(FeatureJob(src=str(qfile), image_root=str(images), out=eval_cache, base=says_2,
                                vision_layers=[1], device=dev))
        for features in (None, eval_cache):
            t = time.time()
            r = run_eval(EvalJob(data=str(qfile), answers=str(annotations), image_root=str(images), base=says_2,
                                 device=dev, scoring="both", max_new_tokens=1, features=features,
                                 out=str(work / f"eval-{dev}-{'cache' if features else 'pixels'}.json")))
            key = f"eval_{dev}_{'cache' if features else 'pixels'}"
            reports[key] = r
            jobs[key] = {"compute": r["compute"], "devices_used": r["devices_used"], "dtypes_used": r["dtypes_used"],
                         "generate_accuracy": r["by_scoring"]["generate"]["accuracy"],
                         "choice_accuracy": r["by_scoring"]["choice"]["accuracy"],
                         "questions_per_s": round(r["n"] / (time.time() - t), 2)}
            if dev == device:
                checks += [ran_on(r, "devices_used"), ran_on(r, "dtypes_used"),
                           abs(r["by_scoring"]["generate"]["accuracy"] - 0.475) < 1e-9]
    choice = {k: [json.loads(x)["metadata"] for x in Path(r["answers_files"]["choice"]).read_text().splitlines()]
              for k, r in reports.items()}
    gpu_rows, cpu_rows = choice[f"eval_{device}_pixels"], choice["eval_cpu_pixels"]
    same = [a["choice"] == b["choice"] for a, b in zip(gpu_rows, cpu_rows)]
    jobs["eval_choice_same_answers_as_cpu"] = all(same)
    jobs["eval_choice_logprob_max_diff_vs_cpu"] = max(abs(a["logprobs"][c] - b["logprobs"][c]) for a, b in
                                                      zip(gpu_rows, cpu_rows) for c in a["logprobs"])
    checks.append(all(same))
    ray.shutdown()
    out["jobs"] = jobs
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["model", "jobs"], help="run one group of checks")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="the jobs' --device (cpu: a dry run of the job checks without a GPU)")
    ap.add_argument("--images", type=int, default=64, help="images the features and caption jobs process")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not (args.only == "jobs" and args.device == "cpu"):
        print("gpu_check: no CUDA device here; run it on a machine with a GPU (or: --only jobs --device cpu)",
              file=sys.stderr)
        return 2
    import transformers

    out: dict = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__,
                 "transformers": transformers.__version__}
    checks: list[bool] = []
    if args.only in (None, "model"):
        checks += model_checks(out)
    if args.only in (None, "jobs"):
        checks += job_checks(out, args.device, args.images)
    out["checks_passed"] = f"{sum(checks)}/{len(checks)}"
    print(json.dumps(out, default=str))
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
