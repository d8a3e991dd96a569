"""Turns a backend's token bytes into text that is safe to send: whole UTF-8, no stop strings."""

from __future__ import annotations

import codecs


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

    def feed(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(piece))

    def flush(self) -> str:
        """The text still held at the end of generation (no stop string can complete now)."""
        if self.stopped:
            return ""
        tail = self._held + self._decoder.decode(b"", final=True)
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
