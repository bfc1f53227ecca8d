"""Incremental detokenisation (pipelines/detokenize.py): the streamed pieces add up to the whole answer decoded
at once, multi-byte characters are never split, and a stop string is cut even when it spans tokens."""

from __future__ import annotations

import random

from cli_module.presets import build_tiny_tokenizer
from pipelines.detokenize import IncrementalText


def stream(tok, ids: list[int], stop: list[str]) -> tuple[list[str], IncrementalText]:
    text = IncrementalText(tok, stop)
    pieces = []
    for i, t in enumerate(ids):
        text.push(t)
        last = i == len(ids) - 1 or text.stopped
        if last:
            text.flush()
        pieces.append(text.delta(finished=last))
        if text.stopped:
            break
    return pieces, text


def test_pieces_add_up_to_the_whole_decode_and_never_split_a_character():
    tok = build_tiny_tokenizer()  # byte-level: "é" and "🙂" are 2 and 4 byte tokens
    rng = random.Random(0)
    words = ["héllo", " wörld", " 🙂", " plain", "\n", " 中文"]
    for _ in range(20):
        sentence = "".join(rng.choice(words) for _ in range(8))
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        pieces, _ = stream(tok, ids, [])
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == sentence
        assert all("\ufffd" not in p for p in pieces)  # no half character was ever sent


def test_stop_strings_are_held_back_and_cut_across_tokens():
    tok = build_tiny_tokenizer()
    ids = tok("The answer is blue. END and more", add_special_tokens=False)["input_ids"]
    pieces, text = stream(tok, ids, ["END", "zzz"])
    assert text.stopped and "".join(pieces) == "The answer is blue. "
    assert all("E" not in p for p in pieces)  # the stop's first letter was held back, never sent
    assert len(pieces) < len(ids)  # decoding ended at the stop, not at the last token
    pieces, text = stream(tok, ids, ["zzz"])  # no stop found: everything arrives, held characters at the end
    assert not text.stopped and "".join(pieces) == "The answer is blue. END and more"
    assert pieces[-1].endswith("re")  # the last two characters were held back until the answer ended
