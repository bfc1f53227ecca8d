"""Can the `small` base's LLM answer the synthetic questions when it is *told* the scene? (issue 15, part 3)

The powered protocol's models stay at the answer prior (bench/RESULTS.md, "Quality"). Two things could hold them
there: the image tokens do not carry the scene in a form the LLM reads, or the LLM (SmolLM2-135M) cannot bind
"the triangle" to "red" within this data and step budget at all. This script separates them by replacing the
image with its caption as text (``captions.jsonl``: every object's colour, shape, texture, stripes and quadrant,
and the dot count), the best an image token could say:

- ``--steps 0``: zero-shot, the LLM as shipped;
- ``--steps N``: after N steps of full fine-tuning on the training questions with their captions (the same
  questions, batch and learning rate as the `instruct` stage), the LLM alone (no encoder, no projector);
- ``--no-caption``: the question alone, i.e. what the LLM gets from the text of the question (the prior).

Scoring is the protocol's choice scoring (the summed log-probability of each candidate answer for the type,
``jobs.eval_choice.score_continuations``), per question type, next to the most-frequent-answer rate.

    python bench/text_oracle.py --data out/q4/data --steps 0 --n 350
    python bench/text_oracle.py --data out/q4/data --steps 300 --n 350
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_module.adapter import load_model  # noqa: E402
from cli_module.loading import load_base  # noqa: E402
from cli_module.prompting import build_example, render  # noqa: E402
from jobs.eval_choice import continuation_ids, score_continuations  # noqa: E402


def question_of(record: dict) -> tuple[str, str]:
    """(question text without the image placeholder, reference answer)."""
    conv = record["conversations"]
    return conv[0]["value"].replace("<image>", "").strip(), conv[1]["value"].strip()


def messages(record: dict, captions: dict[str, str] | None) -> list[dict[str, str]]:
    question, _ = question_of(record)
    text = f"Scene: {captions[record['image']]}\n{question}" if captions is not None else question
    return [{"role": "user", "content": text}]


def balanced(records: list[dict], n: int) -> list[dict]:
    """The first n // types questions of each type, in file order."""
    per: dict[str, list[dict]] = {}
    for r in records:
        per.setdefault(r["type"], []).append(r)
    k = max(1, n // len(per))
    return [r for t in sorted(per) for r in per[t][:k]]


def score(model, records: list[dict], candidates: dict[str, list[str]], captions: dict[str, str] | None,
          batch: int = 8) -> list[bool]:
    """The protocol's choice scoring (``jobs.eval_choice.score_continuations``) of text-only prompts."""
    tok = model.base.tokenizer
    right = []
    for at in range(0, len(records), batch):
        chunk = [(r, messages(r, captions)) for r in records[at: at + batch]]
        inputs, _ = model.prepare_inputs([render(tok, m, add_generation_prompt=True) for _, m in chunk])
        conts = [[continuation_ids(tok, m, c) for c in candidates[r["type"]]] for r, m in chunk]
        for (r, _), scores in zip(chunk, score_continuations(model, inputs, None, conts)):
            cands = candidates[r["type"]]
            right.append(cands[max(range(len(cands)), key=scores.__getitem__)] == question_of(r)[1])
    return right


def finetune(lm: torch.nn.Module, tok, records: list[dict], captions: dict[str, str] | None, steps: int,
             lr: float, batch: int, seed: int) -> list[float]:
    """Full fine-tuning on the answers' tokens (labelled as training labels them: ``build_example``), AdamW, warmup 10%, cosine; bf16 autocast."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, (s - warm) / max(1, steps - warm))))) if s >= warm else (s + 1) / warm)
    rows = [build_example(tok, [{"from": "human", "value": messages(r, captions)[0]["content"]},
                                {"from": "gpt", "value": question_of(r)[1]}], 0) for r in records]  # (ids, labels)
    losses = []
    lm.train()
    for step in range(steps):
        pick = torch.randint(len(rows), (batch,), generator=g).tolist()
        width = max(len(rows[i][0]) for i in pick)
        ids = torch.full((batch, width), tok.pad_token_id or 0)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for b, i in enumerate(pick):
            seq, lab = rows[i]
            ids[b, : len(seq)] = torch.tensor(seq)
            labels[b, : len(seq)] = torch.tensor(lab)
            mask[b, : len(seq)] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lm(ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"  step {step + 1}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
    lm.eval()
    return losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a `crosslayer data synth` folder")
    ap.add_argument("--n", type=int, default=350, help="test questions scored (balanced over types)")
    ap.add_argument("--steps", type=int, default=0, help="fine-tuning steps on the training questions first")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-caption", action="store_true", help="the question alone (no scene text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the result as one JSON line here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    read = lambda f: [json.loads(x) for x in (data / f).read_text().splitlines()]  # noqa: E731
    train, test = read("train.jsonl"), balanced(read("test.jsonl"), args.n)
    captions = None if args.no_caption else {r["image"]: r["caption"] for r in read("captions.jsonl")}
    answers: dict[str, Counter] = {}
    for r in train:
        answers.setdefault(r["type"], Counter())[question_of(r)[1]] += 1
    candidates = {t: sorted(c) for t, c in answers.items()}

    model, _ = load_model(None, shared=load_base("small", vision=False))  # one-to-one; text-only prompts
    lm, tok = model.base.model.lm, model.base.tokenizer
    t0 = time.time()
    if args.steps:
        lm.requires_grad_(True)
        finetune(lm, tok, train, captions, args.steps, args.lr, args.batch, args.seed)
    t1 = time.time()
    right = score(model, test, candidates, captions)
    t2 = time.time()
    rows = {}
    print("| type | choice accuracy | most-frequent-answer rate | questions |\n|---|---|---|---|")
    for t in sorted(candidates):
        got = [ok for ok, r in zip(right, test) if r["type"] == t]
        top = answers[t].most_common(1)[0][0]
        prior = sum(question_of(r)[1] == top for r in test if r["type"] == t) / max(1, len(got))
        rows[t] = {"accuracy": sum(got) / max(1, len(got)), "prior": prior, "n": len(got)}
        print(f"| {t} | {rows[t]['accuracy']:.3f} | {prior:.3f} | {len(got)} |")
    total = sum(right) / len(right)
    print(f"all: {total:.3f} over {len(right)} questions; train {t1 - t0:.0f} s, score {t2 - t1:.0f} s")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"steps": args.steps, "lr": args.lr, "caption": not args.no_caption,
                                "seed": args.seed, "all": total, "types": rows,
                                "train_s": round(t1 - t0), "score_s": round(t2 - t1)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
