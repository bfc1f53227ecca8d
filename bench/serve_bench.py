"""Inference benchmarks, one run, one JSON object on stdout:

  decode      decode tokens/s of a CLI adapter ÷ the one-to-one base with the same LM (KV cache on, same prompt
              and image, the engine in process; only the decode steps after prefill are timed, EOS
              disabled; median of ``--runs`` interleaved runs). Goal >= 0.9.
  scaling     ``bench/decode_scaling.py``'s in-process tokens/s by batch size (1 and each ``--clients``), measured
              in this run: the ceiling for served batching.
  serve       Ray Serve throughput (completion tokens/s) and p50/p99 request latency at each ``--clients`` count
              (in-process Ray + Serve on a free port, an adapter saved to a temp dir, requests over real HTTP from
              threads, each generating exactly ``--max-tokens``: min_tokens = max_tokens). Goal: the largest
              count ÷ one client >= 0.8 x scaling's batch ratio. Then the time to first token of a short streamed
              request sent while a ``--long-tokens`` generation runs, against the same request alone and the long
              one's decode step. Goal: <= alone + 3 decode steps (it joins the running batch at the next step).
  caption     ``jobs.caption.run_caption`` images/s on a temp folder of synthetic images ÷ a bare loop of
              ``prepare_inputs`` + ``generation.complete`` (the engine in process) with the same model over the same images in the same batches
              (both end to end including model load and image decoding, and the bare loop's steady state).

Run by hand (the figures in bench/RESULTS.md came from this command; one torch thread: on a shared CPU two
threads per process oversubscribe the cores and OpenMP spin-waits, which slowed decoding ~20x here):
    .venv/bin/python bench/serve_bench.py --base small --serve-base small --threads 1 --caption-n 32
Shorter: add --quick (3 decode runs, 16 tokens, 1 request per concurrent client, 16 caption images, one TTFT
run against a 64-token generation). Parts can be skipped: --skip decode --skip caption.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLI = {"vision_layers": [3, 6, 9, 12], "inject_layers": [2, 10, 18, 26], "pool": 2, "attn_dim": 256, "heads": 4}
QUESTION = "Describe the image in detail."


def cli_config(base_name: str):
    from cli_module.config import CLIConfig

    if base_name == "small":
        return CLIConfig(**CLI)
    return CLIConfig(vision_layers=[0, 1, 2], inject_layers=[0, 1], attn_dim=16, heads=4, lora_rank=4)  # tiny


def perturb(model, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero plug-in weights (AGF's output projection starts at zero), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def images(n: int, size: int = 224, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def make_cli(base_name: str):
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    torch.manual_seed(0)
    model = FusedVLM(load_base(base_name), cli_config(base_name))
    perturb(model)
    return model.eval()


# --- a. decode tokens/s --------------------------------------------------------------------------------------

def decode_rate(model, image, tokens: int) -> float:
    """Decode tokens/s of one row through the engine in process (bench/decode_scaling.py's prompt and image;
    ``image`` is unused, kept for the callers); EOS disabled, prefill not timed."""
    from bench.decode_scaling import run_batch

    return 1e3 / run_batch(model, 1, 0, tokens + 1)["decode_ms_per_step"]


def bench_decode(base_name: str, tokens: int, runs: int) -> dict:
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    cli = make_cli(base_name)
    base = FusedVLM(load_base(base_name), CLIConfig(method="one_to_one")).eval()  # own base: no CLI hooks on it
    image = images(1)[0]
    decode_rate(cli, image, 4), decode_rate(base, image, 4)  # warm-up
    cli_rates, base_rates = [], []
    for _ in range(runs):  # interleaved, so load from other jobs hits both alike
        cli_rates.append(decode_rate(cli, image, tokens))
        base_rates.append(decode_rate(base, image, tokens))
    c, b = statistics.median(cli_rates), statistics.median(base_rates)
    return {"base": base_name, "decode_tokens": tokens, "runs": runs, "cli_tok_s": round(c, 2),
            "one_to_one_tok_s": round(b, 2), "ratio": round(c / b, 3), "goal": ">= 0.9"}


# --- b. served throughput and latency ------------------------------------------------------------------------

def bench_serve(base_name: str, adapter: Path, clients: list[int], per_client: int, single: int, max_tokens: int,
                threads: int, ttft_runs: int, long_tokens: int, long_rows: int = 8) -> dict:
    """Throughput and latency at each client count, and the time to first token of a short request sent while a
    long generation runs. Every request generates exactly max_tokens (min_tokens = max_tokens: EOS masked, as
    decode_scaling disables it), so tokens/s compare with decode_scaling's."""
    import base64
    import http.client
    import io
    import socket
    import urllib.request

    from ray import serve

    from pipelines.serve import app_builder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    most = max(clients)
    app = app_builder({"adapters": [f"cli={adapter}"], "base": base_name, "max_batch_size": most,
                       "max_ongoing_requests": max(32, 2 * most), "batch_wait_timeout_s": 0.0,
                       "num_cpus": threads, "ingress_num_cpus": 0.1, "api_key_env": None,
                       "max_tokens": max(max_tokens, long_tokens), "default_max_tokens": max_tokens,
                       "max_image_pixels": 512 * 512,
                       "max_image_bytes": 1 << 20, "max_body_bytes": 2 << 20})
    serve.run(app, name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    total = 1 + single + sum(c * per_client for c in clients if c > 1)
    urls = []
    for img in images(total, seed=1):  # warm-up, one client, each concurrent run
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

    def body(i: int, tokens: int, **extra) -> dict:
        return {"model": "cli", "temperature": 0, "max_tokens": tokens, "min_tokens": tokens, **extra,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}},
                                                          {"type": "text", "text": QUESTION}]}]}

    def ask(i: int) -> tuple[float, int]:
        req = urllib.request.Request(url, data=json.dumps(body(i, max_tokens)).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=900) as resp:
            answer = json.loads(resp.read())
        return time.perf_counter() - t0, answer["usage"]["completion_tokens"]

    def streamed(i: int, tokens: int, on_token=None) -> list[float]:
        """Arrival times (perf_counter) of each token of a streamed request, the send time first."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        times = [time.perf_counter()]
        conn.request("POST", "/v1/chat/completions", json.dumps(body(i, tokens, stream=True, logprobs=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for line in resp:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    for _ in (choice.get("logprobs") or {}).get("content") or []:
                        times.append(time.perf_counter())
                        if on_token is not None:
                            on_token(len(times) - 1)
        conn.close()
        return times

    ask(0)  # warm-up

    def run(n_clients: int, jobs: list[int]) -> dict:
        results: list[tuple[float, int]] = []
        lock = threading.Lock()
        queue = list(jobs)

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop()
                r = ask(i)
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        pool = [threading.Thread(target=worker) for _ in range(n_clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        lat = sorted(r[0] for r in results)
        tokens = sum(r[1] for r in results)
        return {"clients": n_clients, "requests": len(results), "completion_tokens": tokens,
                "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2), "req_s": round(len(results) / wall, 3),
                "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3)}

    by_clients, nxt = {}, 1
    for c in clients:
        n = single if c == 1 else c * per_client
        by_clients[c] = run(c, list(range(nxt, nxt + n)))
        nxt += n
        print(json.dumps({"serve_clients": by_clients[c]}), file=sys.stderr, flush=True)

    # time to first token: a short request alone, then sent while long_rows generations of long_tokens run (each
    # past its 16th token); the decode step is the busy batch's (the first long request's steps 2-16)
    alone, during, steps = [], [], []
    for _ in range(ttft_runs):
        t = streamed(0, 8)
        alone.append(t[1] - t[0])
    for _ in range(ttft_runs):
        started = [threading.Event() for _ in range(long_rows)]
        long_times: list[list[float]] = [[] for _ in range(long_rows)]

        def long_run(j: int, times: list[list[float]] = long_times, events: list = started) -> None:
            times[j].extend(streamed(1, long_tokens, on_token=lambda k: k == 16 and events[j].set()))

        workers = [threading.Thread(target=long_run, args=(j,)) for j in range(long_rows)]
        for w in workers:
            w.start()
        for event in started:
            if not event.wait(900):
                raise RuntimeError("a long generation did not reach its 16th token in 900 s")
        t = streamed(2, 8)
        during.append(t[1] - t[0])
        for w in workers:
            w.join()
        gaps = np.diff(long_times[0][1:])  # the first long request's decode steps (before the short one came)
        steps.append(float(np.median(gaps[:15])))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as resp:
        health = json.loads(resp.read())
    serve.shutdown()
    ttft_alone, ttft_during, step = (float(np.median(x)) for x in (alone, during, steps))
    one, many = by_clients[min(clients)], by_clients[most]
    return {"base": base_name, "max_tokens": max_tokens, "model_replica_threads": threads,
            "by_clients": by_clients, "throughput_ratio": round(many["tok_s"] / one["tok_s"], 3),
            "ttft": {"short_alone_s": round(ttft_alone, 3), "short_during_long_s": round(ttft_during, 3),
                     "decode_step_s": round(step, 3), "long_tokens": long_tokens, "long_rows": long_rows,
                     "runs": ttft_runs,
                     "extra_steps": round((ttft_during - ttft_alone) / step, 2),
                     "goal": "short_during_long_s <= short_alone_s + 3 x decode_step_s"},
            "batch_sizes": health["batch_sizes"], "healthz_generated_tokens": health["generated_tokens"]}


# --- c. batch captioning -------------------------------------------------------------------------------------

def bench_caption(base_name: str, adapter: Path, n: int, batch: int, max_tokens: int, work: Path) -> dict:
    from PIL import Image

    from cli_module.adapter import load_model
    from cli_module.prompting import chat_prompt
    from jobs.caption import CaptionJob, run_caption
    from pipelines.generation import Sampling, complete

    folder = work / "images"
    folder.mkdir()
    for i, img in enumerate(images(n, seed=2)):
        img.save(folder / f"{i:05d}.png")
    job = CaptionJob(src=str(folder), out=str(work / "captions"), adapter=str(adapter), base=base_name,
                     max_new_tokens=max_tokens, batch_size=batch, format="jsonl")
    summary = run_caption(job)

    torch.set_num_threads(1)  # as the Captioner actor does
    t0 = time.perf_counter()
    model, _ = load_model(str(adapter), base_name)
    model.eval()
    tok = model.base.tokenizer
    prompt = chat_prompt(tok, job.prompt)
    paths = sorted(folder.iterdir())
    t1 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            chunk = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
            inputs, visual = model.prepare_inputs([prompt] * len(chunk), chunk)
            complete(model, inputs, visual, Sampling(max_new_tokens=max_tokens))
    t2 = time.perf_counter()
    bare_e2e, bare_steady = n / (t2 - t0), n / (t2 - t1)
    return {"base": base_name, "images": n, "batch_size": batch, "max_new_tokens": max_tokens,
            "run_caption": summary, "run_caption_img_s": summary["img_per_s"],
            "bare_loop_img_s_with_load": round(bare_e2e, 3), "bare_loop_img_s_steady": round(bare_steady, 3),
            "ratio_vs_bare_with_load": round(summary["img_per_s"] / bare_e2e, 3),
            "ratio_vs_bare_steady": round(summary["img_per_s"] / bare_steady, 3), "threads": 1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="small", help="base for the decode comparison")
    p.add_argument("--serve-base", default="small", help="base for the serve and caption parts (small or tiny)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (driver and model replica)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent client counts")
    p.add_argument("--per-client", type=int, default=2, help="requests per concurrent client")
    p.add_argument("--single", type=int, default=6, help="requests of the one-client run")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of every served request (min_tokens too)")
    p.add_argument("--ttft-runs", type=int, default=3, help="short requests timed alone and during a long one")
    p.add_argument("--long-tokens", type=int, default=256, help="tokens of each long generation of the TTFT test")
    p.add_argument("--long-rows", type=int, default=8, help="long generations running when the short request comes")
    p.add_argument("--caption-n", type=int, default=64)
    p.add_argument("--caption-batch", type=int, default=8)
    p.add_argument("--caption-tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="fewer runs/requests/images (a few minutes on a CPU)")
    p.add_argument("--skip", action="append", default=[], choices=["decode", "scaling", "serve", "caption"])
    a = p.parse_args()
    if a.quick:
        a.runs, a.per_client, a.single, a.max_tokens, a.caption_n, a.caption_tokens = 3, 1, 3, 16, 16, 8
        a.ttft_runs, a.long_tokens = 1, 64
    torch.set_num_threads(a.threads)
    out: dict = {"torch_threads": a.threads, "cpu_count": os.cpu_count(),
                 "device": "cuda" if torch.cuda.is_available() else "cpu", "quick": a.quick}
    t0 = time.perf_counter()
    if "decode" not in a.skip:
        out["decode"] = bench_decode(a.base, a.decode_tokens, a.runs)
        print(json.dumps({"decode": out["decode"]}), file=sys.stderr, flush=True)  # progress
    if "scaling" not in a.skip:  # the in-process ceiling for served batching, in this same run
        from bench.decode_scaling import measure

        out["decode_scaling"] = measure(a.serve_base, a.threads, a.max_tokens, tuple(sorted({1, *a.clients})))
        print(json.dumps({"decode_scaling": out["decode_scaling"]}), file=sys.stderr, flush=True)
    if not {"serve", "caption"} <= set(a.skip):
        import ray

        from cli_module.adapter import save_adapter

        with tempfile.TemporaryDirectory() as tmp:
            adapter = Path(tmp) / "cli"
            save_adapter(make_cli(a.serve_base), adapter)
            ray.init(num_cpus=a.threads + 1, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
            try:
                if "serve" not in a.skip:
                    out["serve"] = bench_serve(a.serve_base, adapter, a.clients, a.per_client, a.single,
                                               a.max_tokens, a.threads, a.ttft_runs, a.long_tokens, a.long_rows)
                    print(json.dumps({"serve": out["serve"]}), file=sys.stderr, flush=True)
                if "caption" not in a.skip:
                    out["caption"] = bench_caption(a.serve_base, adapter, a.caption_n, a.caption_batch,
                                                   a.caption_tokens, Path(tmp))
            finally:
                ray.shutdown()
    if "serve" in out and "decode_scaling" in out:
        ceiling = out["decode_scaling"]["tok_s_ratio_to_batch1"][max(a.clients)]
        served, ttft = out["serve"]["throughput_ratio"], out["serve"]["ttft"]
        out["goals"] = {
            "throughput": {"served_ratio": served, "decode_scaling_ratio": ceiling, "goal": round(0.8 * ceiling, 3),
                           "met": served >= 0.8 * ceiling},
            "ttft": {"short_during_long_s": ttft["short_during_long_s"],
                     "goal_s": round(ttft["short_alone_s"] + 3 * ttft["decode_step_s"], 3),
                     "met": ttft["short_during_long_s"] <= ttft["short_alone_s"] + 3 * ttft["decode_step_s"]}}
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
