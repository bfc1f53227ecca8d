"""What chunked prefill buys the running rows: ``rows`` requests decode while one long image prompt (``context``
tokens) arrives; per engine step, the wall time, for an engine whose step budget prefills the prompt whole and one
with ``max_step_tokens`` = ``budget`` (the prompt over several steps). Reported: the longest step the running rows
waited for (their worst inter-token gap), the long request's time to its first token, and the median step.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/chunked_prefill.py --random-weights --context 1024 --budget 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(model, rows: int, context: int, budget: int) -> dict:
    import torch

    from bench.decode_scaling import prepared
    from pipelines.serve_engine import Engine

    engine = Engine({"m": model}, max_rows=rows + 1, max_prompt_tokens=1 << 30, max_step_tokens=budget)
    runners = prepared(model, rows, 0, 400)
    (long,) = prepared(model, 1, context, 8)
    long.request_id = "long"
    engine.add(runners)
    while engine.snapshot()["prefilling_requests"]:
        engine.step()
    for _ in range(3):  # the runners are decoding
        engine.step()
    engine.add([long])
    t0, times = time.perf_counter(), []
    with torch.inference_mode():
        while True:
            start = time.perf_counter()
            events = engine.step()
            times.append(time.perf_counter() - start)
            if any(rid == "long" for rid, _ in events):
                break
    first = time.perf_counter() - t0
    engine.reset()
    return {"budget": budget, "context": long.prompt_tokens, "rows": rows, "steps_to_first_token": len(times),
            "worst_step_s": round(max(times), 3), "median_step_s": round(statistics.median(times), 3),
            "long_first_token_s": round(first, 3)}


def main() -> None:
    import torch

    from bench.decode_scaling import build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="small")
    ap.add_argument("--random-weights", action="store_true", help="the small base's shapes, random weights")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.base, args.random_weights)
    measure(model, args.rows, 64, 1 << 30)  # warm-up
    for budget in (1 << 30, args.budget):
        print(json.dumps(measure(model, args.rows, args.context, budget)), flush=True)


if __name__ == "__main__":
    main()
