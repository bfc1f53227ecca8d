"""Batch captioning images/s of one fused model in process: ``prepare_inputs`` + ``pipelines.generation.complete``
over the same images in the same batches (what a caption actor does per batch, without Ray Data around it).

``complete`` is whatever the code on PYTHONPATH has, so one script compares two commits' decoding paths on the same
machine in one sitting: this tree's engine against the path before issue 26 (``FusedVLM.stream``), e.g.
    mkdir /tmp/before-engine && git archive 29a9874 | tar -x -C /tmp/before-engine
    PYTHONPATH=/tmp/before-engine .venv/bin/python bench/caption_rate.py --threads 1
    PYTHONPATH=$PWD .venv/bin/python bench/caption_rate.py --threads 1
`small` base, CLI settings of configs/small-stage2.yaml with non-zero plug-in weights; greedy, EOS enabled
(captions end where the model ends them, as the job does); the first batch is a warm-up, not timed.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM
    from cli_module.prompting import chat_prompt
    from pipelines.generation import Sampling, complete

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FusedVLM(load_base(args.base), CLIConfig(vision_layers=[3, 6, 9, 12], inject_layers=[2, 10, 18, 26],
                                                     pool=2, attn_dim=256, heads=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    prompt = chat_prompt(model.base.tokenizer, "Describe the image briefly.", family=model.base.kind)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(args.images)]
    sampling = Sampling(max_new_tokens=args.tokens)

    def batch(chunk):
        with torch.no_grad():
            inputs, visual = model.prepare_inputs([prompt] * len(chunk), chunk)
            return complete(model, inputs, visual, sampling)

    batch(images[: args.batch])  # warm-up
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(images), args.batch):
        tokens += sum(c.tokens for c in batch(images[i: i + args.batch]))
    took = time.perf_counter() - t0
    print(json.dumps({"img_s": round(len(images) / took, 3), "tokens": tokens, "seconds": round(took, 2),
                      "images": len(images), "batch": args.batch, "max_new_tokens": args.tokens,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
