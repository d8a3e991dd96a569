"""Appends entries to job streams, batching every job's writes into few Redis round trips.

Order within a stream is kept: one pipeline at a time, entries in call order. Tokens are sent
without waiting for Redis to store them (`send`), so a fast backend is not held to one token per
round trip; the first and terminal entries wait (`append`). A failed write is raised by the next
call for that stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.protocol import Entry, encode

MIN_WRITE_INTERVAL_S = 0.002
MAX_UNSENT = 8192
"""Past this many entries not yet written, `send` waits: memory stays bounded if Redis stalls."""


@dataclass(frozen=True, slots=True)
class _Pending:
    key: str
    entry: Entry
    expire_s: int | None
    done: asyncio.Future[str] | None


class StreamWriter:
    def __init__(self, redis: Redis, maxlen: int) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._last_write = 0.0
        self._failed: dict[str, BaseException] = {}
        self._drained = asyncio.Event()

    async def append(self, key: str, entry: Entry, *, expire_s: int | None = None) -> str:
        """XADD `entry` to `key` (and set the key's TTL); returns the entry id once it is stored."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(key, entry, expire_s, done))
        return await done

    async def send(self, key: str, entry: Entry) -> None:
        """XADD `entry` to `key` soon, in order with this stream's other entries."""
        self._enqueue(_Pending(key, entry, None, None))
        if len(self._pending) > MAX_UNSENT:
            self._drained.clear()
            await self._drained.wait()

    def _enqueue(self, item: _Pending) -> None:
        if failure := self._failed.pop(item.key, None):
            raise failure
        self._pending.append(item)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                # Under load, wait out the rest of a short interval since the last write, so
                # that many jobs' tokens share one write instead of one syscall each. An idle
                # writer (a token every few ms) never waits.
                await asyncio.sleep(max(0.0, self._last_write + MIN_WRITE_INTERVAL_S - loop.time()))
                self._last_write = loop.time()
                batch, self._pending = self._pending, []
                self._drained.set()
                try:
                    ids = await self._write(batch)
                except Exception as exc:
                    for item in batch:
                        if item.done is None:
                            self._failed[item.key] = exc
                        elif not item.done.done():
                            item.done.set_exception(exc)
                    continue
                for item, entry_id in zip(batch, ids, strict=True):
                    if item.done is not None and not item.done.done():
                        item.done.set_result(entry_id)
        finally:
            self._flusher = None
            self._drained.set()

    async def _write(self, batch: list[_Pending]) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in batch:
                pipe.xadd(item.key, encode(item.entry), maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
                if item.expire_s is not None:
                    pipe.expire(item.key, item.expire_s)
            results = await pipe.execute()
        ids: list[str] = []
        it = iter(results)
        for item in batch:
            ids.append(next(it).decode())
            if item.expire_s is not None:
                next(it)
        return ids
