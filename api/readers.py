"""Tells the supervisor which streams still have a client reading them.

Each API process keeps a count of its open relays per stream and, once per `reader period`,
refreshes all of them in `sluice:readers`, scored by Redis's clock (and at once when a stream
gains its first reader here). The supervisor stops a generation, or withdraws a queued job,
whose stream has gone unread for `SLUICE_RESUME_GRACE_S`. When the last local reader of a
stream leaves, its member is removed at once (and again at the next refresh), so a grace of 0
acts within a supervisor tick. The key's TTL covers readers only: nothing else lives in it.

Said "at once", these marks still share calls: those that come while one is on its way go
together in the next, each as the stream stands then (read here or not). At a thousand streams
that is a call per round trip instead of one per stream that starts or ends. A stream whose end
a reader here relayed (`ended`) has nothing left for the supervisor to stop: its last reader's
leaving waits for the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.protocol import READERS_KEY, worker_ttl_ms
from shared.scripts import lua

log = logging.getLogger("sluice.api")


class ReaderRegistry:
    def __init__(self, redis: Redis, period_s: float, keep_s: float) -> None:
        self._redis = redis
        self._period_s = period_s
        self._keep_ms = int(keep_s * 1000)
        self._ttl_ms = worker_ttl_ms(period_s)
        self._refresh = redis.register_script(lua("refresh_readers"))
        self._open: Counter[str] = Counter()
        self._left: set[str] = set()
        self._changed: set[str] = set()
        """Streams that gained their first reader here or lost their last, not yet said."""
        self._ended: set[str] = set()
        """Streams read here whose end a reader here has relayed."""
        self._sayer: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def reading(self, stream_id: str, *, announced: bool = False) -> Iterator[None]:
        """Marks `stream_id` as read by this process while the block runs. `announced`: the
        member was just written (by the submit), so it need not be written again now."""
        self._open[stream_id] += 1
        self._left.discard(stream_id)
        if self._open[stream_id] == 1 and not announced:
            self._soon(stream_id)
        try:
            yield
        finally:
            self._open[stream_id] -= 1
            if self._open[stream_id] <= 0:
                del self._open[stream_id]
                # Said at once, not at the next refresh: a queued job nobody reads is passed
                # over by the workers' claims from the supervisor's next tick.
                if stream_id not in self._ended:
                    self._soon(stream_id)
                self._ended.discard(stream_id)
                self._left.add(stream_id)

    def ended(self, stream_id: str) -> None:
        """A reader here has relayed the stream's end (while `reading` it)."""
        if stream_id in self._open:
            self._ended.add(stream_id)

    def _soon(self, stream_id: str) -> None:
        """Say whether `stream_id` is read here without making the caller wait; a failure only
        costs a period."""
        self._changed.add(stream_id)
        if self._sayer is None:
            self._sayer = asyncio.get_running_loop().create_task(self._say_changes())

    async def said(self) -> None:
        """Returns once every change so far has been said (or failed to be)."""
        while (sayer := self._sayer) is not None:
            await asyncio.wait({sayer})

    async def _say_changes(self) -> None:
        try:
            while self._changed:
                changed, self._changed = self._changed, set()
                reading = [s for s in changed if s in self._open]
                left = [s for s in changed if s not in self._open]
                with contextlib.suppress(RedisError, OSError):
                    await self._mark(reading, left)
        finally:
            self._sayer = None

    def _mark(self, reading: list[str], left: list[str]) -> Awaitable[object]:
        return self._refresh(
            keys=[READERS_KEY],
            args=[self._keep_ms, self._ttl_ms, len(reading), *reading, *left],
        )

    async def refresh_forever(self) -> None:
        """Refreshes every period; a failed refresh raises (its supervisor shows and retries
        it), keeping what it could not write for the next one."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._period_s)

    async def refresh(self) -> None:
        """Marks every stream read here read now, and those left since the last refresh left."""
        if not (self._open or self._left):
            return
        left, self._left = self._left, set()
        try:
            await self._mark(list(self._open), list(left))
        except BaseException:
            self._left |= left - self._open.keys()
            raise
