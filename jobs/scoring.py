"""Exact-match scoring of short answers after normalisation (VQA / SQuAD style), overall and per question type.

``normalize_answer`` keeps the first non-empty line, lowercases, drops punctuation and the articles a/an/the,
turns number words into digits ("Three" -> "3") and collapses whitespace, so "The Blue circle." matches
"blue circle". ``score`` takes records with ``prediction``, a reference (``answer``, or else the last ``gpt``
turn of ``conversations``, see ``answer_of``) and an optional ``type``. Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

ARTICLES = frozenset({"a", "an", "the"})
NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")           # a period that is not a decimal point
_PUNCT = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")
ASSISTANT = ("gpt", "assistant")


def normalize_answer(s: Any) -> str:
    """'  The Blue circle.\\nmore' -> 'blue circle'; 'Three' -> '3'; None -> ''."""
    if s is None:
        return ""
    lines = str(s).strip().splitlines()
    text = lines[0].lower() if lines else ""
    text = text.replace("'", "").replace("\u2019", "")   # don't -> dont
    text = _PUNCT.sub(" ", _PERIOD.sub(" ", text))       # top-left -> top left; 3.5 stays
    words = [NUMBERS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def answer_of(record: dict[str, Any]) -> str:
    """The reference answer: ``answer`` if present, else the last ``gpt``/``assistant`` turn."""
    if record.get("answer") is not None:
        return str(record["answer"])
    for turn in reversed(record.get("conversations") or []):
        if turn.get("from", turn.get("role")) in ASSISTANT:
            return str(turn.get("value", turn.get("content", "")))
    raise ValueError(f"record {record.get('id', '?')!r} has no 'answer' and no gpt turn in 'conversations'")


def is_correct(prediction: Any, reference: Any) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """-> {"accuracy", "n", "per_type": {type: accuracy}, "per_type_n": {type: n}}; untyped records count only
    overall. A missing or empty prediction is wrong (unless the reference is empty too)."""
    hits: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    correct = 0
    for record in records:
        ok = is_correct(record.get("prediction"), answer_of(record))
        correct += ok
        if record.get("type") is not None:
            totals[record["type"]] += 1
            hits[record["type"]] += ok
    n = len(records)
    return {"accuracy": correct / n if n else 0.0, "n": n,
            "per_type": {t: hits[t] / totals[t] for t in sorted(totals)},
            "per_type_n": {t: totals[t] for t in sorted(totals)}}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_file(path: str | Path) -> dict[str, Any]:
    """Score a JSONL predictions file (one record per line, as ``score`` expects)."""
    return score(read_jsonl(path))
