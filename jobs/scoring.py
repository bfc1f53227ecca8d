"""The metrics of ``crosslayer eval``, pure Python (no Ray, no torch):

- **exact match** after normalisation (VQA / SQuAD style), overall and per question type (this project's own
  records): ``normalize_answer`` keeps the first non-empty line, lowercases, drops punctuation and the articles
  a/an/the, turns number words into digits ("Three" -> "3") and collapses whitespace, so "The Blue circle."
  matches "blue circle". ``score`` takes records with ``prediction``, a reference (``answer``, or else the last
  ``gpt`` turn of ``conversations``, see ``answer_of``) and an optional ``type``.
- **VQA soft accuracy** (VQAv2 and the benchmarks scored like it): the prediction and the human answers go
  through the official answer processing (``vqa_normalize``: EvalAI's lowercasing, punctuation, number-word,
  article and contraction rules); the score is min(#matching humans / 3, 1) averaged over the 10 leave-one-out
  subsets of 9 humans, as the official evaluation computes it, so an answer 1 human gave scores 0.3, 2 -> 0.6,
  3 -> 0.9, 4 or more -> 1 (``vqa_accuracy``).
- **POPE**: the answer's first sentence reads "no" when it holds the word No, no or not, else "yes", as LLaVA's
  ``eval_pope.py`` reads it (``pope_yes_no``); ``pope_metrics``: accuracy, precision, recall and F1 of "yes",
  and the yes-ratio.
- **multiple choice** (MMBench, ScienceQA): the option letter an answer names (``choice_letter``: "B", "B.",
  "(B)", "B) ...", "The answer is B.", or the text of exactly one option), right when it is the reference.
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


# --- VQA soft accuracy ---------------------------------------------------------------------------------------

_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "I'd've", "I'm",
    "I've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've")


def _spellings(word: str) -> list[str]:
    """The spellings the official table maps back to ``word``: it with one of its apostrophes dropped
    (couldn't've <- couldnt've, couldn'tve)."""
    return [word[:i] + word[i + 1:] for i, ch in enumerate(word) if ch == "'"]


# the official table, rebuilt: each contraction from its one-apostrophe-short spellings, except "lets" and
# "shes" (left as they are), plus its one odd entry
VQA_CONTRACTIONS = {s: w for w in _CONTRACTED for s in _spellings(w) if s not in ("lets", "shes")}
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
# The official pattern: its "(?!<=\d)" is a look-ahead for the literal "<=" and a digit, so in effect any
# period that is not followed by a digit is removed ("3.5" keeps its point, "end." loses it).
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def vqa_normalize(answer: Any) -> str:
    """The official VQA answer processing: ' Two Dogs.' -> '2 dogs'; 'isnt' -> "isn't"; 'the cat' -> 'cat'."""
    text = str(answer or "").lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in VQA_PUNCTUATION:  # next to a space (or with digit groups about) it goes; inside a word it splits it
        if p + " " in text or " " + p in text or _VQA_DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split() if w not in ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: Any, answers: list[str]) -> float:
    """Soft accuracy of one prediction against the human answers (10 in VQAv2): min(#matches among the other
    humans / 3, 1), averaged over leaving out each human in turn."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = vqa_normalize(prediction)
    humans = [vqa_normalize(a) for a in answers]
    matches = sum(h == pred for h in humans)
    # leaving out a human who gave the answer leaves matches - 1 of them; leaving out another leaves all
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def score_vqa(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Records with ``prediction``, ``answers`` (the human answers) and an optional ``type`` (VQAv2's
    answer_type) -> {"accuracy", "n", "per_type", "per_type_n"}."""
    return _by_type([(r.get("type"), vqa_accuracy(r.get("prediction"), r["answers"])) for r in records])


# --- POPE ----------------------------------------------------------------------------------------------------

def pope_yes_no(text: Any) -> str:
    """'No, there is no dog.' -> 'no'; 'There is not.' -> 'no'; 'Yes.' -> 'yes'; anything else -> 'yes'."""
    text = str(text or "")
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, Any]:
    """Yes/no predictions (read with ``pope_yes_no``) against yes/no labels: accuracy, precision, recall and F1
    of "yes", the yes-ratio, and the confusion counts. A ratio whose denominator is 0 is 0."""
    if len(predictions) != len(labels):
        raise ValueError(f"POPE: {len(predictions)} predictions for {len(labels)} labels")
    pairs = [(p == "yes", str(label).strip().lower() != "no") for p, label in zip(predictions, labels)]
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Records with ``prediction`` (the model's text), ``label`` (yes/no) and ``type`` (the POPE category) ->
    the metrics over all records, ``per_type`` accuracy, and ``categories``: each category's metrics (what
    LLaVA's eval_pope.py prints, one block per category)."""
    preds = [pope_yes_no(r.get("prediction")) for r in records]
    out = pope_metrics(preds, [r["label"] for r in records])
    cats: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.get("type") is not None:
            cats[r["type"]].append(i)
    out["categories"] = {c: pope_metrics([preds[i] for i in idx], [records[i]["label"] for i in idx])
                         for c, idx in sorted(cats.items())}
    out["per_type"] = {c: m["accuracy"] for c, m in out["categories"].items()}
    out["per_type_n"] = {c: m["n"] for c, m in out["categories"].items()}
    return out


# --- multiple choice -----------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):]|\s|$)")
_THE_ANSWER_IS = re.compile(r"[Tt]he answer is \(?([A-Z])\b")


def choice_letter(text: Any, choices: list[str]) -> str | None:
    """The option letter an answer names, or None: the letter alone, a leading 'B.', '(B)', 'B)' or 'B ...',
    'The answer is B', or else the text of exactly one option (compared after ``normalize_answer``)."""
    letters = LETTERS[: len(choices)]
    text = str(text or "").strip()
    for pattern in (_LEADING_LETTER, _THE_ANSWER_IS):
        m = pattern.search(text)
        if m and m.group(1) in letters:
            return m.group(1)
    said = normalize_answer(text)
    named = [letters[i] for i, c in enumerate(choices) if said and normalize_answer(c) == said]
    return named[0] if len(named) == 1 else None


def score_choice(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Records with ``prediction``, ``choices``, ``answer`` (the right letter) and an optional ``type`` ->
    {"accuracy", "n", "per_type", "per_type_n", "unparsed": predictions that name no option (counted wrong)}."""
    letters = [choice_letter(r.get("prediction"), r["choices"]) for r in records]
    out = _by_type([(r.get("type"), float(got == r["answer"])) for r, got in zip(records, letters)])
    out["unparsed"] = sum(got is None for got in letters)
    return out


def _by_type(scores: list[tuple[str | None, float]]) -> dict[str, Any]:
    """(type or None, score) pairs -> the mean overall and per type (untyped pairs count only overall)."""
    totals: dict[str, list[float]] = defaultdict(list)
    for t, v in scores:
        if t is not None:
            totals[t].append(v)
    n = len(scores)
    return {"accuracy": sum(v for _, v in scores) / n if n else 0.0, "n": n,
            "per_type": {t: sum(v) / len(v) for t, v in sorted(totals.items())},
            "per_type_n": {t: len(v) for t, v in sorted(totals.items())}}
