"""Decode throughput and decode step time of one fused model through the decoding engine (pipelines/serve_engine.py)
in process: the ceiling that batching in serving can reach, and how a step's cost grows with context.

The `small` base with a CLI plug-in (configs/small-stage2.yaml's layers, non-zero AGF weights so AGF really runs),
one image; every row generates exactly ``--tokens`` (min_tokens = max_tokens: EOS masked). Two measurements:

  batches   per batch size B: B copies of one short image prompt, prefill timed apart from decode;
            tokens/s counts both (as a served request does). ``bench/serve_bench.py`` calls ``measure``.
  contexts  batch ``--context-batch`` (8) at each ``--contexts`` prompt length (filler text tokens before the
            prompt; one request with 8 choices, so one prefill): ms per decode step; ratio of the longest to the shortest in the same run (issue 26's
            "decode step time at 2,048 tokens of context over ~128": goal <= 1.6).

``--random-weights`` builds the `small` base's shapes (DINOv2-S encoder, SmolLM2-135M LM, the 576-wide MLP
projector, its 49,153-token vocabulary) with random weights and a byte-level tokenizer of that vocabulary size: no
weight files, for machines that cannot receive them; step times depend on shapes only. ``--device cuda`` runs it
on a GPU (``--dtype bfloat16`` there, as the jobs do).

    .venv/bin/python bench/decode_scaling.py --threads 1 --batch-sizes 1 8 16 --contexts 128 2048
    # on a GPU machine without the small base's weights:
    python bench/decode_scaling.py --random-weights --device cuda --dtype bfloat16 --batch-sizes 1 8 16 64 \
        --contexts 128 2048 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49153, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2)  # the `small` base's LM config (image token added: 49,153)


def random_small_base():
    """The `small` base's shapes with random weights: DINOv2-S (112 px, 8x8 tokens) + MLP projector + SmolLM2-135M."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Dinov2Model, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cli_module.bases import Base
    from cli_module.composed import ComposedVLM, MLPProjector
    from cli_module.presets import TINY_CHAT_TEMPLATE
    from cli_module.pretrained import SMALL_IMAGE_SIDE, _dinov2_config, _dinov2_image_processor

    torch.manual_seed(0)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<s>", "</s>"]
    filler = [f"<t{i}>" for i in range(SMOLLM2_135M["vocab_size"] - 1 - len(specials) - len(alphabet))]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet + filler)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # id 49,152, as in the small base
    tok.chat_template = TINY_CHAT_TEMPLATE
    lm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    vision = Dinov2Model(_dinov2_config())
    projector = MLPProjector(vision.config.hidden_size, lm.config.hidden_size, input_norm=True)
    for module in (lm, vision, projector):
        module.requires_grad_(False)
    return Base(name="small-random", kind="composed", model=ComposedVLM(vision, projector, lm), tokenizer=tok,
                image_processor=_dinov2_image_processor(SMALL_IMAGE_SIDE),
                image_token_id=tok.convert_tokens_to_ids("<image>"), select_layer=-1, select_strategy="default",
                revision="random")


def build_model(base_name: str = "small", random_weights: bool = False, device: str = "cpu", dtype: str = "float32"):
    import torch

    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    base = random_small_base() if random_weights else load_base(base_name)
    torch.manual_seed(0)
    model = FusedVLM(base, CLIConfig(method="cli", vision_layers=[3, 6, 9, 12], inject_layers=[2, 10, 18, 26],
                                     pool=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero plug-in weights (AGF's W_o starts at zero), as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def prepared(model, rows: int, context: int = 0, tokens: int = 32, choices: bool = False) -> list:
    """``rows`` requests of one image + a short question, with ``context`` - (its length) filler tokens first;
    ``choices``: one request with ``rows`` choices instead (one prefill; the rows decode as separate rows)."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.serve_api import ChatJob, SamplingParams
    from pipelines.serve_engine import Prepared, split_rows

    size = model.base.image_processor.crop_size["height"]
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))
    with torch.inference_mode():
        enc, visual = model.prepare_inputs(["<image>\nDescribe the picture in detail please."], [image])
    ((ids, one),) = split_rows(enc, visual)
    if context > ids.shape[1]:
        fill = model.base.tokenizer(" a", add_special_tokens=False)["input_ids"][-1]
        ids = torch.cat([torch.full((1, context - ids.shape[1]), fill, dtype=ids.dtype, device=ids.device), ids], 1)
    job = ChatJob(model="m", messages=[], images=[], max_tokens=tokens, stop=[],
                  sampling=SamplingParams(temperature=0.0, min_tokens=tokens), n=rows if choices else 1)
    return [Prepared(request_id=f"r{i}", job=job, ids=ids, visual=one) for i in range(1 if choices else rows)]


def run_batch(model, rows: int, context: int, tokens: int, choices: bool = False) -> dict:
    """Prefill ``rows`` requests (or one with ``rows`` choices), then decode until they end -> prefill s, ms per
    decode step, tokens/s."""
    import torch

    from pipelines.serve_engine import Engine

    engine = Engine({"m": model}, max_rows=rows, max_prompt_tokens=1 << 30, max_step_tokens=1 << 30)  # whole prompts
    items = prepared(model, rows, context, tokens, choices)
    sync = torch.cuda.synchronize if model.base.lm_head.weight.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    engine.add(items)
    engine.step()  # the prefill: every prompt whole in one forward, and the first tokens
    sync()
    first = time.perf_counter() - t0
    steps = 0
    while engine.rows:
        engine.step()
        steps += 1
    sync()
    total = time.perf_counter() - t0
    return {"batch": rows, "context": items[0].prompt_tokens, "prefill_s": round(first, 3),
            "decode_ms_per_step": round((total - first) / max(steps, 1) * 1e3, 2),
            "tok_s": round(rows * tokens / total, 1)}


def measure(base_name: str = "small", threads: int = 1, tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
            log: Callable[[dict], None] | None = None, contexts: tuple[int, ...] = (), context_batch: int = 8,
            random_weights: bool = False, device: str = "cpu", dtype: str = "float32", model=None) -> dict:
    """-> {"rows": [{batch, context, prefill_s, decode_ms_per_step, tok_s}], "tok_s_ratio_to_batch1": {batch: ratio},
    "contexts": [...], "step_ratio_longest_to_shortest": r}."""
    import torch

    torch.set_num_threads(threads)
    model = model or build_model(base_name, random_weights, device, dtype)
    run_batch(model, 1, 0, 4)  # warm-up
    rows = []
    for b in batch_sizes:
        rows.append(run_batch(model, b, 0, tokens))
        if log is not None:
            log(rows[-1])
    by_context = []
    for c in contexts:
        by_context.append(run_batch(model, context_batch, c, tokens, choices=True))  # one prefill per context
        if log is not None:
            log(by_context[-1])
    out = {"base": "small (random weights)" if random_weights else base_name, "device": device, "dtype": dtype,
           "threads": threads, "tokens": tokens, "rows": rows,
           "tok_s_ratio_to_batch1": {r["batch"]: round(r["tok_s"] / rows[0]["tok_s"], 2) for r in rows} if rows else {},
           "contexts": by_context}
    if len(by_context) >= 2:
        out["step_ratio_longest_to_shortest"] = round(by_context[-1]["decode_ms_per_step"]
                                                      / by_context[0]["decode_ms_per_step"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--contexts", type=int, nargs="*", default=[], help="prompt lengths for the step-time sweep")
    ap.add_argument("--context-batch", type=int, default=8)
    ap.add_argument("--random-weights", action="store_true", help="the small base's shapes, random weights")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if args.random_weights and args.base != "small":
        ap.error("--random-weights builds the small base's shapes; drop --base or use --base small")
    result = measure(args.base, args.threads, args.tokens, tuple(args.batch_sizes),
                     log=lambda row: print(json.dumps(row), flush=True), contexts=tuple(args.contexts),
                     context_batch=args.context_batch, random_weights=args.random_weights, device=args.device,
                     dtype=args.dtype)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "contexts")}))


if __name__ == "__main__":
    main()
