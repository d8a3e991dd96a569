"""Background loops that never die silently: restarted with backoff, their state readable.

A loop that ends, for any reason but being stopped, is restarted after a backoff that grows
with consecutive failures (and resets once it has run a while). The first failure of a streak
is logged with its traceback; the rest of the streak only counts, so a loop failing every
second does not flood the log. A restarted loop shows as `restarting` until it has run
`SETTLED_AFTER_S` without failing again, so a loop that fails on every tick reads as failing
at every instant, not as `running` between its attempts. `LoopGroup.states()` is what health
checks read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

LoopState = Literal["running", "restarting", "stopped"]
MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0
HEALTHY_AFTER_S = 10.0
"""A loop that ran this long before failing starts its backoff afresh."""
SETTLED_AFTER_S = 1.0
"""A restarted loop that has run this long without failing again counts as running."""


class SupervisedLoop:
    def __init__(self, name: str, run: Callable[[], Awaitable[None]], log: logging.Logger) -> None:
        self.name = name
        self._run = run
        self._log = log
        self._stopped = True
        self._failed = False
        self._restarted_at = 0.0
        self.restarts = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> LoopState:
        if self._stopped:
            return "stopped"
        settling = time.monotonic() - self._restarted_at < SETTLED_AFTER_S
        return "restarting" if self._failed and settling else "running"

    def start(self) -> None:
        self._stopped = False
        self._task = asyncio.create_task(self._supervise(), name=f"loop:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stopped = True

    async def _supervise(self) -> None:
        backoff = MIN_BACKOFF_S
        streak = 0
        while True:
            started = self._restarted_at = time.monotonic()
            try:
                await self._run()
                error = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if streak == 0:
                    self._log.error("loop %s failed; restarting", self.name, exc_info=exc)
            if streak == 0 and error == "returned":
                self._log.error("loop %s ended; restarting", self.name)
            if time.monotonic() - started > HEALTHY_AFTER_S:
                backoff, streak = MIN_BACKOFF_S, 0
            streak += 1
            self.restarts += 1
            self.last_error = error
            self._failed = True
            self._restarted_at = float("inf")  # restarting for the whole backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            if streak > 1 and streak % 10 == 0:
                self._log.warning(
                    "loop %s has failed %d times in a row: %s", self.name, streak, error
                )


class LoopGroup:
    """The background loops of one process."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._loops: list[SupervisedLoop] = []

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> SupervisedLoop:
        loop = SupervisedLoop(name, run, self._log)
        self._loops.append(loop)
        loop.start()
        return loop

    async def stop(self) -> None:
        for loop in reversed(self._loops):
            await loop.stop()
        self._loops.clear()

    def states(self) -> dict[str, LoopState]:
        return {loop.name: loop.state for loop in self._loops}

    @property
    def healthy(self) -> bool:
        return all(state == "running" for state in self.states().values())

    def failing(self) -> Iterable[SupervisedLoop]:
        return (loop for loop in self._loops if loop.state != "running")
