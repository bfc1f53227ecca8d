"""Incremental detokenisation with stop-string hold-back: each new token costs a decode of a few tokens, not of
the whole answer (the engine used to re-decode every row's text every token, O(T^2) per answer).

As vLLM does it: the decoded text grows by ``decode(ids[prefix:]) - decode(ids[prefix:read])``, where
``ids[prefix:read]`` is the last emitted chunk kept as context (tokenizers that drop a word's leading space at the
start of a decode need it), and nothing is added while the new bytes end in an incomplete character (U+FFFD; for
up to 4 tokens, after which the bytes are invalid for good). Stop strings are searched only in the text's new
tail (plus the longest stop's length - 1 before it, plus the bytes still waiting), so a stop string is found at
the token that completes it, as a decode of the whole text would; what may still become a stop string is held
back; the text ends before the first stop found.
"""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """One answer's text, token by token."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # characters that may start a stop string
        self.ids: list[int] = []  # text tokens so far (EOS excluded)
        self.prefix = 0  # ids[prefix:read] is the context of the next decode
        self.read = 0  # ids[:read] are in ``text``
        self.text = ""  # decoded so far
        self.sent = 0  # characters of ``text`` already emitted
        self.stopped = False  # a stop string was found: ``text`` ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        """Add one text token; ``stopped`` turns True when the text now holds a stop string."""
        self.ids.append(token)
        before = len(self.text)
        context = self._decode(self.ids[self.prefix: self.read])
        full = self._decode(self.ids[self.prefix:])
        pending = full[len(context):]
        # an incomplete character waits for its next bytes; 4 tokens without one: those bytes are invalid for good
        if pending and (not full.endswith("\ufffd") or len(self.ids) - self.read >= 4):
            self.text += pending
            self.prefix, self.read = self.read, len(self.ids)
            pending = ""
        self._find_stop(before, pending)

    def _find_stop(self, before: int, pending: str = "") -> None:
        """Search the new tail (and what waits for a character's next bytes) for a stop string."""
        if not self.stop or len(self.text) + len(pending) == before:
            return
        text = self.text + pending
        start = max(0, before - self.hold)
        cuts = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True

    def flush(self) -> None:
        """The answer ended (EOS or length): add what was held for an incomplete character."""
        if self.read < len(self.ids) and not self.stopped:
            before = len(self.text)
            context = self._decode(self.ids[self.prefix: self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(context):]
            self.read = len(self.ids)
            self._find_stop(before)

    def delta(self, finished: bool) -> str:
        """Text not yet emitted: all of it once finished, else all but what may still start a stop string."""
        end = len(self.text) if finished or self.stopped else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        out = self.text[self.sent: end]
        self.sent = end
        return out
