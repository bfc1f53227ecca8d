"""Standard benchmarks as their files come: the questions to ask, their references, and each benchmark's metric.

Question files (``crosslayer eval --data``):
- **LLaVA's evaluation question JSONL** (``scripts/v1_5/eval``: VQAv2, POPE, TextVQA, GQA, ...): one
  ``{"question_id", "image", "text", "category"}`` per line; ``text`` is asked after the image.
- **MMBench's TSV** (``index, question, hint, A, B, C, D, answer, category, image``, the image in base64; a short
  number in ``image`` names the row that holds it): asked as LLaVA's ``model_vqa_mmbench.py
  --single-pred-prompt`` asks it: the hint, the question, one ``A. option`` line per option, then "Answer with
  the option's letter from the given choices directly."
- **LLaVA conversations** (this project's records, ScienceQA's ``llava_test_CQM-A.json``): ``{"id", "image",
  "conversations", "type"}``; *every* human turn is asked, after the earlier turns with their reference replies.
Relative image paths resolve against the image root (``--image-root``, default: the question file's folder).

References (``--answers FILE|DIR``, or fields of the question records) decide the benchmark and its metric:
- ``vqav2``: VQAv2 annotations (``{"annotations": [{"question_id", "answers": [{"answer"}, ...10],
  "answer_type"}]}``) or an ``answers`` list per record; soft accuracy per answer_type (``scoring.score_vqa``).
- ``pope``: POPE label files (a folder of ``coco_pope_<category>.json``, or one of them: JSONL ``{"question_id",
  "image", "text", "label"}``) or a ``label`` per record; accuracy, precision, recall, F1, yes-ratio, per
  category. A category's labels pair with its questions in file order, as LLaVA's eval_pope.py pairs them, and
  each pair's image names must agree.
- ``multiple_choice``: MMBench's ``answer`` column, ScienceQA's ``problems.json`` (``{pid: {"choices",
  "answer": index}}``) or ``choices`` + ``answer`` (a letter, an index or the option's text) per record;
  accuracy of the option letter, per category.
- ``exact``: ``answer``, or the turn's ``gpt`` reply; normalised exact match, per ``type``.
- ``unscored``: no references (VQAv2 test-dev, MMBench test): the answers are written for the official server.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines import storage

from .scoring import (
    LETTERS,
    normalize_answer,
    score,
    score_choice,
    score_pope,
    score_vqa,
    vqa_normalize,
)

Kind = Literal["vqav2", "pope", "multiple_choice", "exact", "unscored"]
KINDS = ("vqav2", "pope", "multiple_choice", "exact", "unscored")
IMAGE = "<image>"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA's single-pred prompt


@dataclass
class EvalItem:
    """One question to ask: the dialogue up to it, its image, and its reference."""

    question_id: Any  # as in the question file (written back unchanged)
    messages: list[dict[str, str]]  # the dialogue, a user turn last; IMAGE marks the image in the turn holding it
    prompt: str  # the question as written to the answers file (LLaVA writes the question text, options included)
    image: str | None = None  # image path or s3:// URI, resolved against the image root; None: a text question
    image_b64: str | None = None  # the image itself, base64 (MMBench's TSV)
    category: str | None = None  # the breakdown: POPE / MMBench category, VQAv2 answer_type, the record's type
    choices: list[str] | None = None  # options of a multiple-choice question (letters A, B, ... in order)
    reference: Any = None  # str (answer, POPE label, right letter) or list[str] (VQA human answers); None: unscored
    instruction: str | None = None  # appended to the question when answers are generated (not for likelihood)
    turn: int = 0  # which human turn of a conversation record this is


@dataclass
class Benchmark:
    kind: Kind  # the metric the references call for
    items: list[EvalItem]  # in question-file order (the answers file keeps it)
    layout: str  # the question file's layout: llava_questions | mmbench_tsv | conversations
    notes: list[str] = field(default_factory=list)  # what was inferred, for the report


# --- question files ----------------------------------------------------------------------------------------

def read_benchmark(data: str, answers: str | None = None, image_root: str | None = None,
                   kind: str = "auto") -> Benchmark:
    """The questions of ``data`` with the references of ``answers`` (or of the records); ``kind`` "auto" infers
    the benchmark from the references, an explicit one is checked against them."""
    if kind not in ("auto", *KINDS):
        raise ValueError(f"benchmark {kind!r} is not one of {['auto', *KINDS]}")
    root = image_root or _folder_of(data)
    if data.endswith(".tsv"):
        layout, items, records = "mmbench_tsv", *read_mmbench(data)
    else:
        records = read_json_records(data)
        if all("conversations" in r for r in records):
            layout, items = "conversations", [it for n, r in enumerate(records) for it in conversation_items(r, n, root)]
        elif all("question_id" in r and "text" in r for r in records):
            layout, items = "llava_questions", [question_item(r, root) for r in records]
        else:
            bad = next(i for i, r in enumerate(records) if "conversations" not in r and not
                       ("question_id" in r and "text" in r))
            raise ValueError(f"{data}: record {bad + 1} has keys {sorted(records[bad])}: expected LLaVA's question "
                             f"format (question_id, image, text) or conversations (id, image, conversations)")
    notes: list[str] = []
    found = attach_references(items, answers, notes) if answers else _inline_kind(items, layout, records)
    if kind != "auto" and kind != found:
        raise ValueError(f"--benchmark {kind} does not fit {answers or data}: its references are {found} "
                         f"references; drop --benchmark or give the {kind} answers file")
    return Benchmark(kind=found, items=items, layout=layout, notes=notes)


def read_json_records(uri: str) -> list[dict[str, Any]]:
    """A JSON array or JSON lines of objects; a malformed line is an error naming it (nothing is skipped)."""
    text = storage.read_bytes(uri).decode()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{uri}: line {n}: invalid JSON ({err.msg})") from err
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{uri}: record {bad[0] + 1} is not a JSON object ({len(bad)} in all)")
    if not records:
        raise ValueError(f"{uri}: no records")
    return records


def question_item(r: dict[str, Any], root: str) -> EvalItem:
    """A line of LLaVA's question JSONL; ``choices`` (if any) are listed after the text as MMBench lists them."""
    text = str(r["text"]).replace(IMAGE, "").strip()
    choices = [str(c) for c in r["choices"]] if r.get("choices") else None
    if choices:
        text += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    image = _resolve(r["image"], root) if r.get("image") else None
    return EvalItem(question_id=r["question_id"], messages=[_user(text, image is not None)], prompt=text,
                    image=image, category=_str(r.get("category", r.get("type"))), choices=choices,
                    instruction=MC_INSTRUCTION if choices else None)


def conversation_items(r: dict[str, Any], n: int, root: str) -> list[EvalItem]:
    """One item per human turn of a conversation record, each after the earlier turns and their replies; the
    reference is the turn's ``gpt`` reply (the record's ``answer`` for its last turn, when it has one)."""
    from cli_module.prompting import to_messages

    rid = r.get("id", n)
    try:
        messages = to_messages(r["conversations"])
    except ValueError as err:
        raise ValueError(f"record {rid!r}: {err}") from err
    image = _resolve(r["image"], root) if r.get("image") else None
    placed = sum(m["content"].count(IMAGE) for m in messages)
    if image is None and placed:
        raise ValueError(f"record {rid!r} has {placed} {IMAGE} placeholder(s) but no 'image'")
    if image is not None and placed > 1:
        raise ValueError(f"record {rid!r} has {placed} {IMAGE} placeholders for its one image")
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError(f"record {rid!r} has no human turn to ask")
    if image is not None and not placed:  # as LLaVA's science eval does: the image goes before the first question
        messages[first_user] = _user(messages[first_user]["content"], True)
    asked = [i for i, m in enumerate(messages) if m["role"] == "user"]
    items = []
    for k, i in enumerate(asked):
        reply = messages[i + 1]["content"] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else None
        if k == len(asked) - 1 and r.get("answer") is not None:
            reply = str(r["answer"])
        items.append(EvalItem(question_id=rid, messages=[dict(m) for m in messages[: i + 1]],
                              prompt=messages[i]["content"].replace(IMAGE, "").strip(), image=image,
                              category=_str(r.get("type", r.get("category"))), reference=reply, turn=k))
    return items


def read_mmbench(uri: str) -> tuple[list[EvalItem], list[dict[str, Any]]]:
    """MMBench's TSV -> items (the options A, B, ... up to the first empty one; ``answer`` the right letter)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode()), delimiter="\t"))
    need = {"index", "question", "image", "A", "B"} - set(rows[0] if rows else {})
    if need:
        raise ValueError(f"{uri}: not an MMBench TSV (no column(s) {sorted(need)})")
    by_index = {r["index"]: r["image"] for r in rows}
    items = []
    for r in rows:
        choices = []
        for letter in LETTERS:
            if _missing(r.get(letter)):
                break
            choices.append(r[letter].strip())
        question = r["question"].strip()
        if not _missing(r.get("hint")):
            question = r["hint"].strip() + "\n" + question
        question += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        image = r["image"]
        if len(image) < 64 and image in by_index:  # a reference to the row that holds the image
            image = by_index[image]
        answer = None if _missing(r.get("answer")) else r["answer"].strip()
        items.append(EvalItem(question_id=int(r["index"]) if r["index"].isdigit() else r["index"],
                              messages=[_user(question, True)], prompt=question, image_b64=image,
                              category=_str(r.get("category")), choices=choices, reference=answer,
                              instruction=MC_INSTRUCTION))
    return items, rows


# --- references --------------------------------------------------------------------------------------------

def _inline_kind(items: list[EvalItem], layout: str, records: list[dict[str, Any]]) -> Kind:
    """The benchmark the question records' own fields call for: MMBench's answer column, the conversations'
    replies, or a question record's ``label`` (POPE), ``answers`` (VQA) or ``answer`` (with ``choices``: the
    right option)."""
    if layout == "mmbench_tsv":
        return "multiple_choice" if all(it.reference is not None for it in items) else "unscored"
    if layout == "conversations":
        return "exact" if all(it.reference is not None for it in items) else "unscored"
    for field_name, kind in (("label", "pope"), ("answers", "vqav2"), ("answer", "exact")):
        if all(r.get(field_name) is not None for r in records):
            for it, r in zip(items, records):
                value = r[field_name]
                it.reference = ([a["answer"] if isinstance(a, dict) else str(a) for a in value] if kind == "vqav2"
                                else str(value).strip().lower() if kind == "pope"
                                else _choice_answer(value, it.choices))
            return "multiple_choice" if kind == "exact" and all(it.choices for it in items) else kind
    return "unscored"


def attach_references(items: list[EvalItem], answers: str, notes: list[str]) -> Kind:
    """Read ``answers`` (a file or a folder of POPE label files), set each item's reference; -> the benchmark."""
    if not answers.endswith((".json", ".jsonl")):  # a folder of POPE label files
        files = sorted(u for u in storage.list_files(answers) if "pope_" in u.rsplit("/", 1)[-1]
                       and u.endswith(".json"))
        if not files:
            raise ValueError(f"{answers}: no POPE label files (*pope_<category>.json) in this folder")
        return _attach_pope(items, {_pope_category(f): read_json_records(f) for f in files}, notes)
    try:
        data = json.loads(storage.read_bytes(answers).decode())
    except json.JSONDecodeError:  # JSON lines
        data = None
    if isinstance(data, dict) and "annotations" in data:  # VQAv2
        by_id = {a["question_id"]: a for a in data["annotations"]}
        for it in items:
            a = _lookup(by_id, it.question_id, answers)
            it.reference = [x["answer"] if isinstance(x, dict) else str(x) for x in a["answers"]]
            it.category = a.get("answer_type", it.category)
        return "vqav2"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "choices" in v for v in data.values()):
        for it in items:  # ScienceQA's problems.json
            p = _lookup(data, str(it.question_id), answers)
            it.choices, it.instruction = [str(c) for c in p["choices"]], MC_INSTRUCTION
            it.reference = LETTERS[int(p["answer"])]
        return "multiple_choice"
    records = read_json_records(answers)
    if all("label" in r for r in records):  # one POPE label file
        return _attach_pope(items, {_pope_category(answers): records}, notes)
    if all("question_id" in r and ("answers" in r or "answer" in r) for r in records):
        by_id = {r["question_id"]: r for r in records}
        for it in items:
            r = _lookup(by_id, it.question_id, answers)
            it.reference = r["answers"] if "answers" in r else _choice_answer(r["answer"], it.choices)
        return ("vqav2" if all(isinstance(it.reference, list) for it in items) else
                "multiple_choice" if all(it.choices for it in items) else "exact")
    raise ValueError(f"{answers}: not a references file this eval reads (VQAv2 annotations, POPE labels, "
                     f"ScienceQA problems.json, or JSONL with question_id and answer(s))")


def _attach_pope(items: list[EvalItem], labels: dict[str | None, list[dict[str, Any]]], notes: list[str]) -> Kind:
    """Pair each category's questions (file order) with its label file's lines, checking counts and images."""
    one_file = len(labels) == 1 and (None in labels or all(it.category is None for it in items))
    for category, rows in labels.items():
        asked = items if one_file else [it for it in items if it.category == category]
        if len(asked) != len(rows):
            raise ValueError(f"POPE category {category!r}: {len(rows)} labels for {len(asked)} questions")
        for k, (it, row) in enumerate(zip(asked, rows)):
            want = os.path.basename(str(row.get("image", "")))
            if want and it.image and os.path.basename(it.image) != want:
                raise ValueError(f"POPE category {category!r}, question {k + 1} (question_id {it.question_id}): "
                                 f"image {os.path.basename(it.image)!r}, its label is for {want!r}; the label "
                                 f"file and the question file list the category in different orders")
            it.reference = str(row["label"]).strip().lower()
            it.category = it.category or category
    missing = [it for it in items if it.reference is None]
    if missing:
        cats = sorted({str(it.category) for it in missing})
        raise ValueError(f"{len(missing)} question(s) of categories {cats} have no POPE label file")
    notes.append(f"POPE labels paired by category and file order: {sorted(map(str, labels))}")
    return "pope"


def _pope_category(uri: str) -> str | None:
    name = uri.rsplit("/", 1)[-1].removesuffix(".jsonl").removesuffix(".json")
    return name.rsplit("pope_", 1)[1] if "pope_" in name else None


def _choice_answer(answer: Any, choices: list[str] | None) -> str:
    """A multiple-choice reference as the right letter (given as a letter, an index or the option's text)."""
    if not choices:
        return str(answer)
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return LETTERS[answer]
    text = str(answer).strip()
    if text in LETTERS[: len(choices)]:
        return text
    named = [LETTERS[i] for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(text)]
    if len(named) != 1:
        raise ValueError(f"answer {answer!r} is not a letter, an index or one of the options {choices}")
    return named[0]


def _lookup(table: dict, key: Any, source: str) -> Any:
    for k in (key, str(key), int(key) if str(key).isdigit() else None):
        if k in table:
            return table[k]
    raise ValueError(f"{source}: no reference for question_id {key!r}")


# --- scoring, candidates, answers ----------------------------------------------------------------------------

def score_items(kind: Kind, items: list[EvalItem], predictions: list[str]) -> dict[str, Any]:
    """The benchmark's metric over ``predictions`` (one text per item, in order)."""
    rows = [{"prediction": p, "type": it.category} for it, p in zip(items, predictions)]
    if kind == "unscored":
        return {"n": len(items), "scored": False}
    for row, it in zip(rows, items):
        row.update({"vqav2": {"answers": it.reference}, "pope": {"label": it.reference},
                    "multiple_choice": {"answer": it.reference, "choices": it.choices},
                    "exact": {"answer": it.reference}}[kind])
    return {"vqav2": score_vqa, "pope": score_pope, "multiple_choice": score_choice, "exact": score}[kind](rows)


def candidates(kind: Kind, items: list[EvalItem], max_candidates: int) -> list[list[str]]:
    """What likelihood scoring chooses among: each item's options, or else the answers the data holds for its
    category (the most common human answer of each VQA question; POPE: yes / no); refuses open answer sets
    larger than ``max_candidates``."""
    if all(it.choices for it in items):
        return [list(it.choices) for it in items]
    if kind == "unscored":
        raise ValueError("likelihood scoring needs choices or references to draw candidates from; these "
                         "questions have neither")
    seen: dict[str | None, dict[str, str]] = {}
    for it in items:
        answer = (Counter(vqa_normalize(a) for a in it.reference).most_common(1)[0][0] if kind == "vqav2"
                  else str(it.reference))
        seen.setdefault(it.category, {}).setdefault(normalize_answer(answer), answer.strip())
    too_many = {c: len(v) for c, v in seen.items() if len(v) > max_candidates}
    if too_many:
        c, n = max(too_many.items(), key=lambda x: x[1])
        raise ValueError(f"question type {c!r} has {n} distinct answers, more than --max-candidates "
                         f"{max_candidates}: likelihood scoring is for closed answer sets; give the records "
                         f"'choices' or raise --max-candidates")
    return [list(it.choices) if it.choices else list(seen[it.category].values()) for it in items]


def answer_rows(items: list[EvalItem], texts: list[str], model_id: str,
                metadata: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """LLaVA's answers-file rows ({question_id, prompt, text, answer_id, model_id, metadata}), in item order."""
    out = []
    for k, (it, text) in enumerate(zip(items, texts)):
        meta = {"turn": it.turn} if it.turn else {}
        meta.update((metadata or [{}] * len(items))[k])
        out.append({"question_id": it.question_id, "prompt": it.prompt, "text": text,
                    "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": meta})
    return out


# --- helpers -------------------------------------------------------------------------------------------------

def _user(text: str, with_image: bool) -> dict[str, str]:
    text = text.replace(IMAGE, "").strip()
    return {"role": "user", "content": f"{IMAGE}\n{text}" if with_image else text}


def _resolve(image: str, root: str) -> str:
    """An image path as the feature cache records sources: s3:// URIs as they are, local paths absolute."""
    path = image if image.startswith(("s3://", "/")) else storage.join(root, image)
    return path if path.startswith("s3://") else os.path.abspath(path)


def _folder_of(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _missing(value: Any) -> bool:
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
