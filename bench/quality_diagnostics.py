"""Two measurements behind bench/RESULTS.md's "Why" (the powered quality protocol), on a --work folder of
bench/quality_powered.py:

* ``tokens``: the norm of the cached vision tokens per layer, and of P's tokens (the base's projector, or a
  stage-1 adapter's) per layer with their spread across images, against the LLM's token-embedding norm;
* ``prior``: whether models read the image at all: per type, the reference's choice log-probability against the
  answer prior's, and how much a candidate's log-probability moves across images for the same question text;
* ``captions``: whether a model reads the image when it describes it: teacher-forced on validation images'
  captions, the argmax accuracy at each colour / shape / texture / stripe / quadrant / count word, with the
  image's own features and with another image's (the same text, the wrong image: what the words' context alone
  gives);
* ``gates``: a CLI adapter's gate logit at the position that predicts the answer, split into its terms
  W_g,h . h + W_g,c . c_k + b_k per vision layer, with the cosine of c_k and W_g,c (decoder layer ``--layer``).

    python bench/quality_diagnostics.py tokens --work out/quality-powered --adapter out/quality-powered/stage1/adapter
    python bench/quality_diagnostics.py tokens --work out/quality-powered --base small     # the untrained projector
    python bench/quality_diagnostics.py gates --work out/quality-powered --adapter out/quality-powered/cli-seed0/adapter
    python bench/quality_diagnostics.py prior stage1-instruct cli-seed0 --work out/quality-instruct
    python bench/quality_diagnostics.py captions --work out/q4 --adapter out/q4/stage1-captions/adapter
    python bench/quality_diagnostics.py captions --work out/q4 --base out/q4/stage1-instruct-mix/model
(``--base DIR`` loads an adapter over another base folder, e.g. the `small` v1 folder of run 1.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cache_rows(cache: str, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a feature cache: source, select (B, N, D), layers (B, K, N', D)."""
    from pipelines.feature_cache import load_cache_table, table_to_numpy

    return table_to_numpy(load_cache_table(cache).slice(0, n))


def model_and_cache(args: argparse.Namespace) -> tuple[Any, Any, dict[str, str]]:
    """-> (the model: --adapter over --base, or --base as is; --cache held in memory, checked against it; the
    cache's image ids by image file name)."""
    from cli_module.adapter import load_model
    from cli_module.loading import load_base
    from pipelines.feature_cache import CacheLookup, read_cache_info

    model, _ = load_model(args.adapter, args.base)
    model.eval()
    cache = str(Path(args.work) / args.cache)
    key = read_cache_info(cache)["key"]
    lookup = CacheLookup(cache, load_base(key["base"], weights=False), model.vision_layers, key["pool"])
    by_name = {Path(str(s)).name: str(i) for s, i in zip(lookup.columns["source"], lookup.columns["image_id"])}
    return model, lookup, by_name


def image_ids(by_name: dict[str, str], images: list[str], cache: str) -> list[str]:
    missing = [i for i in images if Path(i).name not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} image(s) not in the feature cache {cache}, e.g. {missing[0]}: build the "
                         f"cache from this --work's data (bench/quality_powered.py does)")
    return [by_name[Path(i).name] for i in images]


def tokens(args: argparse.Namespace) -> None:
    from cli_module.adapter import load_model
    from pipelines.feature_cache import read_cache_info

    cache = str(Path(args.work) / args.cache)
    rows, layers = cache_rows(cache, args.images), read_cache_info(cache)["key"]["layers"]
    model, _ = load_model(args.adapter, args.base)
    with torch.no_grad():
        emb = model.base.language_model.embed_tokens.weight.norm(dim=-1).mean()
        print(f"LLM token embedding norm {emb:.2f}")
        named = [("select", torch.from_numpy(rows["select"].astype(np.float32)))]
        named += [(f"layer {k}", torch.from_numpy(rows["layers"][:, i].astype(np.float32))) for i, k in enumerate(layers)]
        for name, x in named:  # (B, N, D)
            p = model.base.projector(x)
            print(f"{name}: cached token norm {x.norm(dim=-1).mean():.2f}; P's tokens norm {p.norm(dim=-1).mean():.2f},"
                  f" spread across images {p.std(0).norm(dim=-1).mean():.2f}")


def gates(args: argparse.Namespace) -> None:
    from cli_module.prompting import render

    model, lookup, by_name = model_and_cache(args)
    records = [json.loads(x) for x in (Path(args.work) / "data" / "val-sub.jsonl").read_text().splitlines()]
    records = records[: args.images]
    feats = lookup.features(image_ids(by_name, [r["image"] for r in records], args.cache))
    tok, family = model.base.tokenizer, model.base.kind
    prompts = [render(tok, [{"role": "user", "content": r["conversations"][0]["value"]}], add_generation_prompt=True,
                      family=family) for r in records]
    inputs, visual = model.prepare_inputs(prompts, features=feats)
    agf, seen = model.agf[args.layer], {}
    forward = agf.forward

    def spy(h, kv, mask=None):  # the gate's terms at the last prompt position, as AGF.forward computes them
        keys, values = kv
        b, s, _ = h.shape
        hn = agf.norm_q(h.to(agf.q_proj.weight.dtype))
        w_h, w_c = agf.gate_proj.weight[0, : hn.shape[-1]], agf.gate_proj.weight[0, hn.shape[-1]:]
        k, dh = keys.shape[2], keys.shape[-1]
        q = agf.q_proj(hn).view(b, s, agf.heads, dh).transpose(1, 2).unsqueeze(2).expand(b, agf.heads, k, s, dh)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, keys, values)  # (B, H, K, S, dh)
        c = ctx.permute(0, 3, 2, 1, 4).reshape(b, s, k, agf.attn_dim)[:, -1]  # (B, K, A)
        seen.update(wh=(hn[:, -1] @ w_h).mean(), wc=(c @ w_c).mean(0), c_norm=c.norm(dim=-1).mean(0),
                    cos=((c @ w_c) / (c.norm(dim=-1) * w_c.norm())).mean(0), bias=agf.gate_bias[:, 0])
        return forward(h, kv, mask)

    agf.forward = spy
    with torch.no_grad():
        out = model(**inputs, visual=visual, return_gates=True)
    gate = out.gates[:, -1, args.layer].mean(0)  # (K,)
    print(f"decoder layer {model.config.inject_layers[args.layer]}, {len(records)} validation prompts, answer position")
    print(f"gate per vision layer {gate.numpy().round(4)}; W_g,h . h {float(seen['wh']):.2f}")
    print(f"W_g,c . c_k {seen['wc'].numpy().round(2)}; |c_k| {seen['c_norm'].numpy().round(1)}; "
          f"cos(c_k, W_g,c) {seen['cos'].numpy().round(3)}; b_k {seen['bias'].detach().numpy().round(4)}")
    w = agf.gate_proj.weight.detach()[0]
    print(f"|W_g,c| {float(w[model.base.language_model.config.hidden_size:].norm()):.3f}, "
          f"|gate_proj.weight| {float(w.norm()):.3f}")


def prior(args: argparse.Namespace) -> None:
    """Does a model read the image at all? From its choice-scored answers (eval.answers.choice.jsonl), per question
    type: the reference's log-probability normalised over the candidates, against the answer prior's (the
    reference's share of the training answers of that type, among the same candidates); and, for questions whose
    text is identical, the spread across images of each candidate's log-probability."""
    import math
    from collections import Counter, defaultdict

    work = Path(args.work)
    records = [json.loads(x) for x in (work / "data" / "test-sub.jsonl").read_text().splitlines()]
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in map(json.loads, (work / "data" / "train.jsonl").read_text().splitlines()):
        counts[r["type"]][r["answer"]] += 1
    for run in args.runs:
        rows = [json.loads(x) for x in (work / run / "eval.answers.choice.jsonl").read_text().splitlines()]
        if len(rows) != len(records) or "metadata" not in rows[0]:
            raise ValueError(f"{run}: needs the full choice answers file of the {len(records)} test questions")
        model, prior_lp = defaultdict(list), defaultdict(list)
        same_text = defaultdict(lambda: defaultdict(list))  # question text -> candidate -> log-probs over images
        for row, q in zip(rows, records):
            lp = row["metadata"]["logprobs"]
            z = math.log(sum(math.exp(v) for v in lp.values()))
            model[q["type"]].append(lp[q["answer"]] - z)
            c = counts[q["type"]]
            prior_lp[q["type"]].append(math.log(max(c[q["answer"]], 1) / sum(max(c[a], 1) for a in lp)))
            for cand, v in lp.items():
                same_text[row["prompt"]][cand].append(v - z)
        spread = [float(np.std(v)) for by in same_text.values() for v in by.values() if len(v) >= 10]
        flat = lambda d: float(np.mean([x for v in d.values() for x in v]))  # noqa: E731
        print(f"{run}: reference log-prob {flat(model):.3f} (answer prior {flat(prior_lp):.3f}); spread of a "
              f"candidate's log-prob across images, same question text: median {np.median(spread):.3f} "
              f"({len(spread)} candidate x question-text pairs)")
        print("  per type (model / prior): " + "; ".join(f"{t} {np.mean(model[t]):.3f} / {np.mean(prior_lp[t]):.3f}"
                                                      for t in sorted(model)))


CAPTION_WORDS = {  # word category -> the caption's words of it (pipelines.synth's vocabulary)
    "color": {"red", "green", "blue", "yellow", "purple", "orange"},
    "shape": {"circle", "square", "triangle", "diamond"},
    "texture": {"plain"},  # "a plain red square" (a striped one: "a red square with ... stripes")
    "stripes": {"horizontal", "vertical", "diagonal"},
    "quadrant": {"top", "bottom", "left", "right"},
    "count": {"one", "two", "three", "four", "five", "six"},
}


def captions(args: argparse.Namespace) -> None:
    """Teacher-forced caption words, right image against another image's features (see the module docstring)."""
    from cli_module.prompting import render
    from jobs.eval_choice import continuation_ids

    work = Path(args.work)
    model, lookup, by_name = model_and_cache(args)
    val = {json.loads(x)["image"] for x in (work / "data" / "val.jsonl").read_text().splitlines()}
    caps = [r for r in map(json.loads, (work / "data" / "captions.jsonl").read_text().splitlines())
            if r["image"] in val][: args.images]
    tok, family = model.base.tokenizer, model.base.kind
    msgs = [{"role": "user", "content": "<image>\nDescribe the image briefly."}]
    prompt = render(tok, msgs, add_generation_prompt=True, family=family)
    hits = {which: {c: [] for c in CAPTION_WORDS} for which in ("own image", "another image")}
    for at in range(0, len(caps), 8):
        chunk = caps[at: at + 8]
        conts = [continuation_ids(tok, msgs, r["caption"], family=family) for r in chunk]
        texts = [prompt + tok.decode(c) for c in conts]
        ids = image_ids(by_name, [r["image"] for r in chunk], args.cache)
        for which, order in (("own image", ids), ("another image", ids[1:] + ids[:1])):
            inputs, visual = model.prepare_inputs(texts, features=lookup.features(order))
            with torch.no_grad():
                logits = model(**inputs, visual=visual, float_logits=True).logits  # (B, S, V)
            for b, cont in enumerate(conts):
                got = inputs["input_ids"][b, -len(cont):].tolist()
                if got != cont:
                    raise ValueError(f"the caption's tokens do not end the input: {got[:8]} vs {cont[:8]}")
                pred = logits[b, -len(cont) - 1: -1].argmax(-1).tolist()  # position j predicts token j + 1
                for t, p in zip(cont, pred):
                    word = tok.decode([t]).strip(" .,")
                    for cat, words in CAPTION_WORDS.items():
                        if word in words:
                            hits[which][cat].append(t == p)
    print(f"{len(caps)} validation captions, teacher-forced argmax accuracy per word category")
    print("| features | " + " | ".join(CAPTION_WORDS) + " |\n|---|" + "---|" * len(CAPTION_WORDS))
    for which, by in hits.items():
        print(f"| {which} | " + " | ".join(f"{np.mean(v):.3f} ({len(v)})" for v in by.values()) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["tokens", "gates", "prior", "captions"])
    ap.add_argument("runs", nargs="*", help="prior: run folders under --work (e.g. stage1-instruct cli-seed0)")
    ap.add_argument("--work", default="out/quality-powered", help="bench/quality_powered.py's --work")
    ap.add_argument("--adapter", default=None, help="a stage-1 adapter (tokens; none: --base's own projector) or a "
                                                    "CLI adapter (gates)")
    ap.add_argument("--base", default=None, help="the base folder to load the adapter over (default: its own)")
    ap.add_argument("--cache", default="cache-pool2")
    ap.add_argument("--images", type=int, default=40, help="cache rows (tokens), validation prompts (gates) "
                                                                   "or validation captions (captions)")
    ap.add_argument("--layer", type=int, default=0, help="gates: which injection layer (index into inject_layers)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"tokens": tokens, "gates": gates, "prior": prior, "captions": captions}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
