"""Tells workers which streams still have a client reading them.

Each API process keeps a count of its open relays per stream and, once per `reader period`,
refreshes all of them with one ZADD into `sluice:readers` (and at once when a stream gains its
first reader here). A worker stops a generation whose
stream has gone unread for `SLUICE_RESUME_GRACE_S`. When the last local reader of a stream
leaves, its member is removed at the next refresh, so a grace of 0 stops the worker within a
period and a check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.protocol import READERS_KEY, now_ms

log = logging.getLogger("sluice.api")


class ReaderRegistry:
    def __init__(self, redis: Redis, period_s: float, keep_s: float) -> None:
        self._redis = redis
        self._period_s = period_s
        self._keep_ms = int(keep_s * 1000)
        self._open: Counter[str] = Counter()
        self._left: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def reading(self, stream_id: str, *, announced: bool = False) -> Iterator[None]:
        """Marks `stream_id` as read by this process while the block runs. `announced`: the
        member was just written (by the submit), so it need not be written again now."""
        self._open[stream_id] += 1
        self._left.discard(stream_id)
        if self._open[stream_id] == 1 and not announced:
            self._soon(self._redis.zadd(READERS_KEY, {stream_id: now_ms()}))
        try:
            yield
        finally:
            self._open[stream_id] -= 1
            if self._open[stream_id] <= 0:
                del self._open[stream_id]
                self._left.add(stream_id)

    def _soon(self, command: Awaitable[object]) -> None:
        """Run a Redis command without making the caller wait; a failure only costs a period."""

        async def run() -> None:
            with contextlib.suppress(RedisError, OSError):
                await command

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_forever(self) -> None:
        while True:
            if self._open or self._left:
                now = now_ms()
                left, self._left = self._left, set()
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        if left:
                            pipe.zrem(READERS_KEY, *left)
                        if self._open:
                            pipe.zadd(READERS_KEY, dict.fromkeys(self._open, now))
                        pipe.zremrangebyscore(READERS_KEY, "-inf", now - self._keep_ms)
                        pipe.pexpire(READERS_KEY, self._keep_ms)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    log.warning("could not refresh readers: %s", exc)
            await asyncio.sleep(self._period_s)
