"""Generated token ids → text deltas for streaming, with OpenAI's stop strings.

Decoding only the new token would cut multi-byte characters and lose tokenizers' context-dependent
spacing, so each step decodes a short window (the last emitted token onwards) and keeps the part after
what that window decoded to before. A delta that could still become a stop string is held back until it
cannot; the reply never contains the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(stop)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of `text` already produced
        self._read = 0
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token: int) -> str:
        """Add one generated token; return the text that may be sent now ("" while a character or a
        possible stop string is incomplete). Check `stopped` afterwards."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, at the end of generation (a dangling partial character included, as decode shows it)."""
        if not self.stopped:
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            if len(after) > len(before):
                self.text += after[len(before) :]
                self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            # a stop string cannot begin before `sent`: any possible beginning was held back
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                self.stopped = True
                return self._emit(cut)
        end = len(self.text) if final else len(self.text) - self._held()
        return self._emit(end)

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def _held(self) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        for k in range(min(self._longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
