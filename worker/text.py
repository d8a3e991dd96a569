"""Turns a backend's token bytes into text that is safe to send: whole UTF-8, no stop strings;
and, per choice, keeps each token's logprobs with its text."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shared.protocol import FinishReason


class TextAssembler:
    """Feed token bytes in order; get back the text that can go to the client now.

    A multi-byte character split across tokens is held until complete. Text that might be the
    start of a stop string is held until it either completes the stop string (then it and
    everything after are dropped) or turns out not to match (then it is released).
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.decoded = 0
        """Characters decoded so far, released or held."""

    def feed(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        text = self._decoder.decode(piece)
        self.decoded += len(text)
        return self._release(text)

    def flush(self) -> str:
        """The text still held at the end of generation (no stop string can complete now)."""
        if self.stopped:
            return ""
        last = self._decoder.decode(b"", final=True)
        self.decoded += len(last)
        tail = self._held + last
        self._held = ""
        return tail

    def _release(self, text: str) -> str:
        pending = self._held + text
        if not self._stops:
            return pending
        cut = min((i for s in self._stops if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return pending[:cut]
        keep = max(self._partial_match(pending, s) for s in self._stops)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    @staticmethod
    def _partial_match(text: str, stop: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of `stop`."""
        for size in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0


LogprobEntries = list[dict[str, Any]]


class Released(NamedTuple):
    """Text that can go to the client now, with the logprobs of the tokens it completes, and
    where it starts in its choice's answer."""

    text: str
    logprobs: LogprobEntries
    offset: int


@dataclass
class ChoiceText:
    """One choice's answer: its text (`TextAssembler`), and each token's logprobs, sent with
    the text that completes the token. A token whose text a stop string cuts keeps its logprobs
    if any of its text is sent; tokens wholly after the cut lose theirs with their text."""

    stop: list[str]
    produced: int = 0
    """Tokens generated for it."""
    reason: FinishReason | None = None
    """Why it ended, once it has."""
    assembler: TextAssembler = field(init=False)
    _pending: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    """(start, end) in the decoded text, and the entry, of tokens whose text is not all out."""
    _released: int = 0

    def __post_init__(self) -> None:
        self.assembler = TextAssembler(self.stop)

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def stopped(self) -> bool:
        """A stop string ended it."""
        return self.assembler.stopped

    def feed(self, piece: bytes, logprobs: LogprobEntries | None = None) -> Released:
        start = self.assembler.decoded
        text = self.assembler.feed(piece)
        if logprobs:
            self._pending += [(start, self.assembler.decoded, entry) for entry in logprobs]
        elif not self._pending:  # plain text: nothing to match it with
            offset, self._released = self._released, self._released + len(text)
            return Released(text, [], offset)
        return self._release(text)

    def flush(self) -> Released:
        return self._release(self.assembler.flush(), final=True)

    def _release(self, text: str, final: bool = False) -> Released:
        offset = self._released
        self._released += len(text)
        if final or self.stopped:
            # Everything that will ever be sent is out: a token with any of its text in it
            # keeps its logprobs, the rest were cut.
            out = [e for start, _, e in self._pending if start < self._released or final]
            self._pending.clear()
            return Released(text, out, offset)
        # Out once all its text is: a token that ends a character another began counts from
        # that character, and goes with it.
        done = [p for p in self._pending if p[1] <= self._released and p[0] < self._released]
        if done:
            self._pending = [p for p in self._pending if p not in done]
        return Released(text, [e for _, _, e in done], offset)
