"""``crosslayer quickstart``: the fused model end to end on an embedded base, reported step by step.

Today: build the base, wrap it with an untrained CLI plug-in, check it reproduces the base's logits, then
generate an answer about a drawn image with the KV cache, and write ``summary.json`` to the report folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def demo_image(size: int = 224) -> Image.Image:
    """A red circle left of a blue square on white: something a question can be asked about."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    s = size // 8
    draw.ellipse([s, 3 * s, 3 * s, 5 * s], fill="red")
    draw.rectangle([5 * s, 3 * s, 7 * s, 5 * s], fill="blue")
    return img


def run_quickstart(preset: str, out: Path) -> int:
    from .bases import load_base
    from .config import CLIConfig
    from .model import FusedVLM
    from .prompting import chat_prompt

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] loading the {preset!r} base ...", flush=True)
    base = load_base(preset)
    depth_v, depth_t = base.num_vision_layers, base.num_text_layers
    cfg = CLIConfig(vision_layers=sorted({1, depth_v // 2, depth_v - 1, depth_v}),
                    inject_layers=sorted({0, depth_t // 2, depth_t - 1}),
                    attn_dim=16 if preset == "tiny" else 256, pool=1)
    model = FusedVLM(base, cfg)
    counts = model.param_counts()
    print(f"[2/4] fused model: vision layers {cfg.vision_layers} -> decoder layers {cfg.inject_layers}; "
          f"{counts['trainable_params']:,} of {counts['total_params']:,} parameters trainable "
          f"({counts['trainable_percent']}%)", flush=True)
    prompt = chat_prompt(base.tokenizer, "What is left of the blue square? Answer in a few words.")
    inputs, visual = model.prepare_inputs([prompt], images=[demo_image()])
    image_mask = inputs["input_ids"] == base.image_token_id
    with torch.no_grad():
        fused = model(**inputs, visual=visual).logits
        plain = FusedVLM(base, CLIConfig(method="one_to_one"))(**inputs, visual=visual).logits
    diff = float((fused - plain).abs().max())
    print(f"[3/4] untrained plug-in vs base: max |logit difference| = {diff:.3g} over "
          f"{inputs['input_ids'].shape[1]} tokens ({int(image_mask.sum())} image tokens)", flush=True)
    tokens, gates = model.generate(**inputs, visual=visual, max_new_tokens=12,
                                   eos_token_id=base.tokenizer.eos_token_id, return_gates=True)
    answer = base.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    print(f"[4/4] generated with the KV cache: {answer!r}; gate tensor {tuple(gates.shape)} "
          f"(batch, token, injection layer, vision layer)", flush=True)
    summary = {"preset": preset, "params": counts, "cli_config": cfg.to_dict(), "zero_init_max_abs_diff": diff,
               "answer": answer, "gates_shape": list(gates.shape), "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"report: {out.resolve()}/summary.json ({summary['seconds']} s)")
    return 0
