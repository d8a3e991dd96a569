"""Stops running jobs early when told to: a cancel request, or the supervisor finding that no
client has read the stream for the resume grace. Both arrive on `CANCEL_CHANNEL`.

A job notices a stop between pieces; while it waits inside `StopSignal.interrupting()`, the
stop also cancels the wait itself, so an engine that is silent (a long prompt, a queue of its
own) has its request closed at once rather than when it next sends something.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType

from shared.errors import Cancelled
from shared.protocol import StopReason


class HandedBack(Exception):
    """The job went back to the queue, for a worker whose engine answers: this one stops, and
    writes nothing more to its stream."""

    def __init__(self) -> None:
        super().__init__("given back to the queue")


_MESSAGES: dict[StopReason, str] = {
    "cancelled": "cancelled by request",
    "unread": "no client was reading the stream",
}


@dataclass
class StopSignal:
    """Set when the job should stop; `reason` says why, for the client's error event."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: StopReason = "cancelled"
    _waiting: asyncio.Task[object] | None = field(default=None, init=False, repr=False)
    """The job's task, while it is inside `interrupting()`."""
    _interrupted: bool = field(default=False, init=False, repr=False)
    _handed_back: bool = field(default=False, init=False, repr=False)

    def hand_back(self) -> None:
        """Stop, the job having been given back to the queue (see `HandedBack`)."""
        if not self.event.is_set():
            self._handed_back = True
            self.stop("cancelled")

    def stop(self, reason: StopReason) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()
            if self._waiting is not None:
                self._interrupted = True
                self._waiting.cancel()

    def interrupting(self) -> _Interrupting:
        """`async with`: a stop cancels whatever the job awaits inside, which then raises
        `Cancelled`; any other cancellation (job timeout, shutdown) goes on as it came."""
        return _Interrupting(self)

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def error(self) -> Cancelled | HandedBack:
        if self._handed_back:
            return HandedBack()
        return Cancelled(_MESSAGES[self.reason])


class _Interrupting:
    """As `asyncio.timeout()` does: our own cancellation is told from others' by `uncancel`."""

    def __init__(self, signal: StopSignal) -> None:
        self._signal = signal

    async def __aenter__(self) -> None:
        if self._signal.stopped:
            raise self._signal.error()
        self._signal._waiting = asyncio.current_task()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        signal = self._signal
        signal._waiting = None
        if signal._interrupted and kind is asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            if task.uncancel() == 0:
                raise signal.error() from None


class JobControl:
    """One per worker process: the stop signal of each running job, by stream id."""

    def __init__(self) -> None:
        self._running: dict[str, StopSignal] = {}
        self._let_go: set[str] = set()

    def watch(self, stream_id: str) -> StopSignal:
        signal = self._running[stream_id] = StopSignal()
        return signal

    def release(self, stream_id: str) -> None:
        self._running.pop(stream_id, None)

    def let_go(self, attempt: str) -> None:
        """`attempt` (a job id) ended here without its stream's end: the next heartbeat says
        so, and the supervisor retries or ends the stream."""
        self._let_go.add(attempt)

    def to_report(self) -> list[str]:
        """The attempts let go of, for a heartbeat; `reported` once it has told Redis."""
        return sorted(self._let_go)

    def reported(self, attempts: list[str]) -> None:
        self._let_go.difference_update(attempts)

    def stop(self, message: str) -> None:
        """Act on a `CANCEL_CHANNEL` message, `<stream id> <reason>`."""
        stream_id, _, reason = message.partition(" ")
        if signal := self._running.get(stream_id):
            signal.stop("unread" if reason == "unread" else "cancelled")
