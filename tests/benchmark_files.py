"""Small benchmark files in the layouts the benchmarks publish them, and a tiny checkpoint whose answers and
log-probabilities are known by hand (a helper, not a test file).

``rigged_checkpoint(out, token, logit)``: a tiny llava-hf folder (``hub_checkpoints.save_tiny_checkpoint``)
whose weights make every text position's logits exactly ``logit`` for ``token`` and 0 for the other V - 1
tokens: the decoder layers add nothing (attention ``o_proj`` and MLP ``down_proj`` zero), every token embeds as
(sqrt(D), 0, ..., 0), so the final RMSNorm gives (sqrt(D), 0, ...) at every position, and the LM head reads
only that first coordinate. So greedy decoding answers ``token`` again and again, and a candidate reply of n
tokens, k of them ``token``, has log-probability k * logit - n * log(e^logit + V - 1) (``rigged_logprob``).

Layouts (as LLaVA's ``scripts/v1_5/eval`` and the benchmarks ship them):
- VQAv2: question JSONL ``{"question_id", "image", "text", "category"}`` + ``v2_mscoco_val2014_annotations.json``
  ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}]}``
- POPE: ``llava_pope_test.jsonl`` (question_id unique over the file, ``category``) + ``coco/coco_pope_<category>.json``
  label files (JSONL ``{"question_id", "image", "text", "label"}``, ids from 1 in each file)
- MMBench: a TSV ``index question hint A B C D answer category image source l2-category comment split`` with
  the image in base64 (or the index of the row holding it)
- ScienceQA: ``llava_test_CQM-A.json`` (a JSON array of conversations, options in the text, some without an
  image) + ``problems.json`` ``{pid: {"question", "choices", "answer": index, "image", "subject", ...}}``
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
from hub_checkpoints import save_tiny_checkpoint

VOCAB = 261  # the tiny llava tokenizer: 5 specials + 256 byte tokens
SHORT = "\nAnswer the question using a single word or phrase."  # LLaVA's short-answer prompt suffix


def rigged_checkpoint(out: Path, token: str, logit: float = 3.0, family: str = "llava") -> Path:
    """A tiny hub-layout checkpoint that always answers ``token`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForImageTextToText

    save_tiny_checkpoint(out, family)
    model = AutoModelForImageTextToText.from_pretrained(out)
    lm = model.model.language_model
    dim = lm.config.hidden_size
    tok_id = _token_id(out, token)
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.embed_tokens.weight.zero_()
        lm.embed_tokens.weight[:, 0] = math.sqrt(dim)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok_id, 0] = logit / math.sqrt(dim)
    model.save_pretrained(out, safe_serialization=True)
    return out


def rigged_logprob(reply_tokens: list[str], token: str, logit: float = 3.0, vocab: int = VOCAB) -> float:
    """The log-probability the rigged model gives a reply of these tokens."""
    hits = sum(t == token for t in reply_tokens)
    return hits * logit - len(reply_tokens) * math.log(math.exp(logit) + vocab - 1)


def _token_id(folder: Path, token: str) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(token, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{token!r} is {len(ids)} tokens"
    return ids[0]


def png(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def coco_name(i: int) -> str:
    return f"COCO_val2014_{i:012d}.jpg"


def write_coco_images(folder: Path, ids: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (folder / coco_name(i)).write_bytes(png(i))  # PNG bytes under COCO's .jpg names: PIL reads either


# --- VQAv2 ----------------------------------------------------------------------------------------------------

def vqav2_files(root: Path, questions: list[tuple[int, int, str, str, list[str]]]) -> tuple[Path, Path, Path]:
    """(question_id, image id, question, answer_type, 10 human answers) -> (question JSONL, annotations, image
    folder)."""
    images = root / "vqav2" / "val2014"
    write_coco_images(images, sorted({q[1] for q in questions}))
    qfile = write_jsonl(root / "vqav2" / "llava_vqav2_mscoco_val.jsonl", [
        {"question_id": qid, "image": coco_name(img), "text": text + SHORT, "category": "default"}
        for qid, img, text, _, _ in questions])
    annotations = {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco", "annotations": [
        {"question_id": qid, "image_id": img, "question_type": " ".join(text.lower().split()[:2]),
         "answer_type": atype, "multiple_choice_answer": max(set(answers), key=answers.count),
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]}
        for qid, img, text, atype, answers in questions]}
    afile = root / "vqav2" / "v2_mscoco_val2014_annotations.json"
    afile.write_text(json.dumps(annotations))
    return qfile, afile, images


# --- POPE -----------------------------------------------------------------------------------------------------

def pope_files(root: Path, labels: dict[str, list[tuple[int, str, str]]]) -> tuple[Path, Path, Path]:
    """{category: [(image id, object, yes/no)]} -> (LLaVA's question JSONL, the label folder, image folder)."""
    images = root / "pope" / "val2014"
    write_coco_images(images, sorted({img for rows in labels.values() for img, _, _ in rows}))
    questions, qid = [], 0
    for category, rows in labels.items():
        label_rows = []
        for k, (img, obj, label) in enumerate(rows, start=1):
            qid += 1
            text = f"Is there a {obj} in the image?"
            questions.append({"question_id": qid, "image": coco_name(img), "text": text + SHORT,
                              "category": category})
            label_rows.append({"question_id": k, "image": coco_name(img), "text": text, "label": label})
        write_jsonl(root / "pope" / "coco" / f"coco_pope_{category}.json", label_rows)
    return write_jsonl(root / "pope" / "llava_pope_test.jsonl", questions), root / "pope" / "coco", images


# --- MMBench --------------------------------------------------------------------------------------------------

MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def mmbench_tsv(path: Path, rows: list[dict]) -> Path:
    """Rows with index, question, hint, options A-D (missing: 'nan'), answer, category; ``image``: a seed for a
    PNG, or ``"ref:<index>"`` for the index of the row holding the image (as MMBench stores repeats)."""
    lines = ["\t".join(MMBENCH_COLUMNS)]
    for r in rows:
        image = str(r["image"])[4:] if str(r["image"]).startswith("ref:") else base64.b64encode(png(r["image"])).decode()
        values = {**{c: "nan" for c in MMBENCH_COLUMNS}, **{k: str(v) for k, v in r.items()}, "image": image,
                  "source": "test", "l2-category": "perception", "split": "dev"}
        lines.append("\t".join(values[c] for c in MMBENCH_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# --- ScienceQA ------------------------------------------------------------------------------------------------

def scienceqa_files(root: Path, problems: dict[str, dict]) -> tuple[Path, Path, Path]:
    """{pid: {"question", "choices", "answer": index, "image": bool}} -> (llava_test_CQM-A.json, problems.json,
    the image folder ``images/test``, images at ``<pid>/image.png``)."""
    images, records, full = root / "scienceqa" / "images" / "test", [], {}
    for pid, p in problems.items():
        options = " ".join(f"({'ABCDE'[k]}) {c}" for k, c in enumerate(p["choices"]))
        text = f"Context: N/A\nQuestion: {p['question']}\nOptions: {options}"
        record = {"id": pid, "conversations": [{"from": "human", "value": text + ("\n<image>" if p["image"] else "")},
                                               {"from": "gpt", "value": f"The answer is {'ABCDE'[p['answer']]}."}]}
        if p["image"]:
            (images / pid).mkdir(parents=True, exist_ok=True)
            (images / pid / "image.png").write_bytes(png(int(pid)))
            record["image"] = f"{pid}/image.png"
        records.append(record)
        full[pid] = {"question": p["question"], "choices": p["choices"], "answer": p["answer"], "hint": "",
                     "image": "image.png" if p["image"] else None, "task": "closed choice", "grade": "grade2",
                     "subject": "natural science", "topic": "biology", "category": "Classification",
                     "skill": "Identify mammals", "lecture": "", "solution": "", "split": "test"}
    qfile = root / "scienceqa" / "llava_test_CQM-A.json"
    qfile.parent.mkdir(parents=True, exist_ok=True)
    qfile.write_text(json.dumps(records, indent=1))
    (root / "scienceqa" / "problems.json").write_text(json.dumps(full))
    return qfile, root / "scienceqa" / "problems.json", images
