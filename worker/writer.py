"""Appends entries to job streams, batching every job's writes of one event-loop turn into one
Redis round trip. Order within a stream is kept: one pipeline at a time, entries in call order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.protocol import Entry, encode


@dataclass(frozen=True, slots=True)
class _Pending:
    key: str
    entry: Entry
    expire_s: int | None
    done: asyncio.Future[str]


class StreamWriter:
    def __init__(self, redis: Redis, maxlen: int) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, key: str, entry: Entry, *, expire_s: int | None = None) -> str:
        """XADD `entry` to `key` (and set the key's TTL); returns the entry id once it is stored."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(key, entry, expire_s, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    ids = await self._write(batch)
                except Exception as exc:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                    continue
                for item, entry_id in zip(batch, ids, strict=True):
                    if not item.done.done():
                        item.done.set_result(entry_id)
        finally:
            self._flusher = None

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
