"""Stops running jobs early when told to: a cancel request, or the supervisor finding that no
client has read the stream for the resume grace. Both arrive on `CANCEL_CHANNEL`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shared.errors import Cancelled
from shared.protocol import StopReason

_MESSAGES: dict[StopReason, str] = {
    "cancelled": "cancelled by request",
    "unread": "no client was reading the stream",
}


@dataclass
class StopSignal:
    """Set when the job should stop; `reason` says why, for the client's error event."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: StopReason = "cancelled"

    def stop(self, reason: StopReason) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def error(self) -> Cancelled:
        return Cancelled(_MESSAGES[self.reason])


class JobControl:
    """One per worker process: the stop signal of each running job, by stream id."""

    def __init__(self) -> None:
        self._running: dict[str, StopSignal] = {}

    def watch(self, stream_id: str) -> StopSignal:
        signal = self._running[stream_id] = StopSignal()
        return signal

    def release(self, stream_id: str) -> None:
        self._running.pop(stream_id, None)

    def stop(self, message: str) -> None:
        """Act on a `CANCEL_CHANNEL` message, `<stream id> <reason>`."""
        stream_id, _, reason = message.partition(" ")
        if signal := self._running.get(stream_id):
            signal.stop("unread" if reason == "unread" else "cancelled")
