"""Decode throughput of one fused model by batch size: the ceiling that batching in serving can reach.

In-process ``FusedVLM.stream`` on the `small` base with a CLI plug-in (configs/small-stage2.yaml's layers), one
image and prompt repeated B times, ``--tokens`` new tokens with EOS disabled; prefill is timed apart from decode,
and tokens/s counts both (as a served request does). ``bench/serve_bench.py`` calls ``measure`` in its own run to
compare served throughput with this ceiling.

    .venv/bin/python bench/decode_scaling.py --threads 1 --batch-sizes 1 4 8 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(base_name: str = "small", threads: int = 1, tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
            log: Callable[[dict], None] | None = None) -> dict:
    """-> {"rows": [{batch, prefill_s, decode_ms_per_step, tok_s}], "tok_s_ratio_to_batch1": {batch: ratio}}."""
    import numpy as np
    import torch
    from PIL import Image

    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    torch.set_num_threads(threads)
    base = load_base(base_name)
    model = FusedVLM(base, CLIConfig(method="cli", vision_layers=[3, 6, 9, 12], inject_layers=[2, 10, 18, 26],
                                     pool=2)).eval()
    size = base.image_processor.crop_size["height"] if hasattr(base.image_processor, "crop_size") else 112
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))
    rows = []
    for b in batch_sizes:
        enc, visual = model.prepare_inputs(["<image>\nDescribe the picture in detail please."] * b, [image] * b)
        t0, first, n = time.perf_counter(), 0.0, 0
        with torch.no_grad():
            for _ in model.stream(enc["input_ids"], enc["attention_mask"], visual=visual,
                                  max_new_tokens=tokens, eos_token_id=[]):
                n += 1
                first = first or time.perf_counter() - t0
        total = time.perf_counter() - t0
        rows.append({"batch": b, "prefill_s": round(first, 3),
                     "decode_ms_per_step": round((total - first) / (n - 1) * 1e3, 1), "tok_s": round(b * n / total, 1)})
        if log is not None:
            log(rows[-1])
    return {"base": base_name, "threads": threads, "tokens": tokens, "rows": rows,
            "tok_s_ratio_to_batch1": {r["batch"]: round(r["tok_s"] / rows[0]["tok_s"], 2) for r in rows}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args()
    result = measure(args.base, args.threads, args.tokens, tuple(args.batch_sizes),
                     log=lambda row: print(json.dumps(row), flush=True))
    print(json.dumps({"tok_s_ratio_to_batch1": result["tok_s_ratio_to_batch1"]}))


if __name__ == "__main__":
    main()
