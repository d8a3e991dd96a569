"""Appends entries to job streams, batching every job's writes into few Redis round trips.

Order within a stream is kept: one write at a time, entries in call order. Text is sent without
waiting for Redis to store it (`send`), so a fast backend is not held to one token per round
trip; the first and terminal entries wait (`append`). Text sent while the stream's previous token
entry is still unwritten joins that entry: a worker that falls behind writes fewer, larger
entries instead of falling further behind, and one that keeps up writes a token per entry. A
failed write is raised by the next call for that stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.protocol import Entry, Token, encode

# Appends a batch of entries, in order, each to its own job's stream: one command for the batch,
# where a pipeline of XADDs costs this process a command's encoding per token.
# KEYS: each entry's stream. ARGV: MAXLEN, then per entry its kind, payload and TTL (0: none).
APPEND_SCRIPT = """
local ids = {}
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 3
  ids[i] = redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], '*', ARGV[at], ARGV[at + 1])
  if ARGV[at + 2] ~= '0' then redis.call('EXPIRE', key, ARGV[at + 2]) end
end
return ids
"""
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
        self._append = redis.register_script(APPEND_SCRIPT)
        self._maxlen = maxlen
        self._pending: list[_Pending] = []
        self._open_token: dict[str, int] = {}
        """Stream key -> index in `_pending` of its token entry, while nothing follows it."""
        self._flusher: asyncio.Task[None] | None = None
        self._last_write = 0.0
        self._failed: dict[str, BaseException] = {}
        self._drained = asyncio.Event()

    def append(self, key: str, entry: Entry, *, expire_s: int | None = None) -> asyncio.Future[str]:
        """XADD `entry` to `key` (and set the key's TTL), in order from this call on; the future
        gives the entry's id once it is stored."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(key, entry, expire_s, done))
        return done

    async def send(self, key: str, text: str) -> None:
        """Append `text` to `key` soon, in order with this stream's other entries."""
        at = self._open_token.get(key)
        if at is not None:
            self._raise_failure(key)
            unsent = self._pending[at].entry
            assert isinstance(unsent, Token)
            self._pending[at] = _Pending(key, Token(unsent.text + text), None, None)
            return
        self._enqueue(_Pending(key, Token(text), None, None))
        self._open_token[key] = len(self._pending) - 1
        if len(self._pending) > MAX_UNSENT:
            self._drained.clear()
            await self._drained.wait()

    def _raise_failure(self, key: str) -> None:
        if failure := self._failed.pop(key, None):
            raise failure

    def _enqueue(self, item: _Pending) -> None:
        self._raise_failure(item.key)
        self._open_token.pop(item.key, None)
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
                self._open_token.clear()
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
        args: list[str | int] = [self._maxlen]
        for item in batch:
            args.extend(encode(item.entry))
            args.append(item.expire_s or 0)
        ids = await self._append(keys=[item.key for item in batch], args=args)
        return [entry_id.decode() for entry_id in ids]
