"""GPU benchmark of the training step: the fused model (CLI plug-in, features as the cache gives them) in bf16
under DeepSpeed ZeRO-2 on one CUDA device, in a single process (no Ray: world size 1 through
``deepspeed.init_distributed``). Prints one JSON line: GPU name, median step time, tokens/s, peak GPU memory,
and the same step with the frozen encoder run on the fly (random pixels) for comparison.

    python bench/gpu_step.py                       # random weights with the `small` base's shapes
    python bench/gpu_step.py --base tiny --batch 8

``--base small-shape`` (default) needs no pretrained files: DINOv2 ViT-S/14 (384 wide, 12 layers, 6 heads, patch
14, the small preset's image side) and SmolLM2-135M (576 wide, 30 layers, 9 heads / 3 KV heads, MLP 1536,
vocabulary 49152, tied embeddings) are built from transformers configs with random weights and composed like the
`small` preset (``ComposedVLM`` + a 2-layer MLP projector). Timing does not depend on the weights' values.
Self-contained: besides torch, transformers and deepspeed it imports only ``cli_module``. Exits with a message
(code 2) where there is no CUDA device or no deepspeed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
DINOV2_S = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14}
PLUGIN = {  # the CLI settings of configs/small-stage2.yaml and configs/tiny.yaml
    "small-shape": {"vision_layers": [3, 6, 9, 12], "inject_layers": [2, 10, 18, 26], "lora_rank": 16,
                    "lora_alpha": 32, "heads": 4, "attn_dim": 256, "pool": 1},
    "tiny": {"vision_layers": [1, 2], "inject_layers": [0, 1], "lora_rank": 4, "lora_alpha": 8, "heads": 2,
             "attn_dim": 16},
}


def small_shape_base():
    """The `small` preset's architecture with random weights (no files needed)."""
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from cli_module import pretrained
    from cli_module.bases import Base
    from cli_module.composed import ComposedVLM, MLPProjector

    side = getattr(pretrained, "SMALL_IMAGE_SIDE", 224)
    vision = Dinov2Model(Dinov2Config(image_size=side, **DINOV2_S))
    lm = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    model = ComposedVLM(vision, MLPProjector(DINOV2_S["hidden_size"], SMOLLM2["hidden_size"]), lm)
    model.eval().requires_grad_(False)
    return Base(name="small-shape", kind="composed", model=model, tokenizer=None, image_processor=None,
                image_token_id=SMOLLM2["vocab_size"] - 1, select_layer=-1, select_strategy="default")


def ds_config(batch: int, zero_stage: int) -> dict:
    """Mirrors jobs.train_config.deepspeed_config for one process in bf16 (torch AdamW passed separately)."""
    return {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": True},
            "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False}


def init_single_process() -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl")


def main() -> int:
    p = argparse.ArgumentParser(description="one bf16 DeepSpeed ZeRO-2 training step of the fused model on CUDA")
    p.add_argument("--base", choices=sorted(PLUGIN), default="small-shape")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--text-tokens", type=int, default=48, help="text tokens per sequence besides the image's")
    p.add_argument("--answer-tokens", type=int, default=8, help="labelled tokens at the end of each sequence")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine. "
              "For CPU figures use bench/train_step.py.", file=sys.stderr)
        return 2
    try:
        import deepspeed
    except ImportError as err:
        print(f"gpu_step.py: deepspeed is not installed ({err}); pip install deepspeed", file=sys.stderr)
        return 2

    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM, VisionFeatures

    torch.manual_seed(0)
    base = small_shape_base() if args.base == "small-shape" else load_base("tiny")
    model = FusedVLM(base, CLIConfig(**PLUGIN[args.base])).cuda()
    counts = model.param_counts()
    init_single_process()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=ds_config(args.batch, args.zero_stage))

    dev, b = torch.device("cuda"), args.batch
    n = base.grid ** 2  # image tokens per image (select strategy drops CLS)
    dv, k = base.vision_config.hidden_size, len(model.vision_layers)
    seq = n + args.text_tokens
    ids = torch.randint(3, base.text_config.vocab_size - 2, (b, seq), device=dev)  # (B, S)
    ids[ids == base.image_token_id] += 1  # placeholders only where the image goes:
    ids[:, 8:8 + n] = base.image_token_id  # after a short prompt prefix
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer_tokens:] = ids[:, -args.answer_tokens:]
    mask = torch.ones_like(ids)
    features = VisionFeatures(select_features=torch.randn(b, n, dv, device=dev, dtype=torch.bfloat16),  # (B, N, Dv)
                              layers=torch.randn(b, k, n, dv, device=dev, dtype=torch.bfloat16))  # (B, K, N, Dv)
    side = base.vision_config.image_size
    pixels = torch.randn(b, 3, side, side, device=dev, dtype=torch.bfloat16)  # (B, 3, H, W)

    def step(**visual) -> None:
        out = engine(ids, mask, labels=labels, **visual)
        engine.backward(out.loss)
        engine.step()

    def timed(**visual) -> list[float]:
        for _ in range(args.warmup):
            step(**visual)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(**visual)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    torch.cuda.reset_peak_memory_stats()
    cached = timed(features=features)
    peak = torch.cuda.max_memory_allocated()
    encoder = timed(pixel_values=pixels)
    median = statistics.median(cached)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(), "base": args.base, "method": "cli", "precision": "bf16",
        "zero_stage": args.zero_stage, "batch": b, "seq_len": seq, "image_tokens": n,
        "step_ms_median": round(1000 * median, 2), "step_ms_mean": round(1000 * statistics.mean(cached), 2),
        "tokens_per_s": round(b * seq / median), "peak_mem_gib": round(peak / 2**30, 3),
        "step_ms_median_encoder_on_the_fly": round(1000 * statistics.median(encoder), 2),
        "cache_over_encoder": round(median / statistics.median(encoder), 3),
        "trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
        "steps": args.steps, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }), flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
