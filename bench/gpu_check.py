"""CUDA-path checks of the fused model, for a machine with a GPU (run by hand; prints one JSON line).

- bf16 on CUDA: an untrained CLI plug-in gives exactly the base's logits (LLaVA-1.5 and LLaVA-OneVision tiny);
- fp32 on CUDA: cached generation equals an uncached greedy loop, token for token, with non-zero plug-in weights;
- bf16 on CUDA: cached vs uncached greedy tokens (reported: bf16 kernels differ by shape, so ties may flip);
- the features path equals the pixel path on CUDA (max |logit difference|).

    python bench/gpu_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from cli_module.prompting import chat_prompt

    cfg = dict(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4)
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    out["transformers"] = transformers.__version__
    for name in ("tiny", "tiny-onevision"):
        base = load_base(name, dtype=torch.bfloat16)
        base.model.cuda()
        model = FusedVLM(base, CLIConfig(**cfg)).cuda().to(torch.bfloat16)
        prompts = [chat_prompt(base.tokenizer, "what is it?")]
        imgs = images(1, (30, 20) if name == "tiny-onevision" else (16, 16))
        inputs, visual = model.prepare_inputs(prompts, images=imgs)
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
        cached, gates = model.generate(**inputs, visual=visual, max_new_tokens=12, return_gates=True)
        uncached, _ = model.generate(**inputs, visual=visual, max_new_tokens=12, use_cache=False)
        key = "fp32" if dtype == torch.float32 else "bf16"
        out[f"{key}_cached_equals_uncached"] = bool(torch.equal(cached, uncached))
        out[f"{key}_gates_shape"] = list(gates.shape)
        if dtype == torch.float32:
            pixels = base.image_processor(images=images(2), return_tensors="pt")["pixel_values"].cuda()
            feats = model.encode_images(pixels)
            with torch.no_grad():
                a = model(**inputs, pixel_values=pixels).logits
                b = model(**inputs, features=feats).logits
            out["fp32_features_vs_pixels_max_diff"] = float((a - b).abs().max())
    print(json.dumps(out))
    ok = out["tiny_bf16_zero_init_equal"] and out["tiny-onevision_bf16_zero_init_equal"] and out["fp32_cached_equals_uncached"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
