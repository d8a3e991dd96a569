"""Decides when a running job must stop early: it was cancelled, or nobody is reading it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.protocol import READERS_KEY, now_ms, worker_ttl_ms

log = logging.getLogger("sluice.worker")


@dataclass
class StopSignal:
    """Set when the job should stop; `reason` says why, for the client's error event."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    last_read_ms: int = field(default_factory=now_ms)

    def stop(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


class JobControl:
    """One per worker process: a single loop checks every running job's readers at once."""

    def __init__(self, redis: Redis, heartbeat_s: float, grace_s: float) -> None:
        self._redis = redis
        self._period_s = min(heartbeat_s, 0.5)
        self._reader_ttl_ms = worker_ttl_ms(heartbeat_s)
        self._grace_ms = int(grace_s * 1000)
        self._running: dict[str, StopSignal] = {}

    def watch(self, stream_id: str) -> StopSignal:
        signal = self._running[stream_id] = StopSignal()
        return signal

    def release(self, stream_id: str) -> None:
        self._running.pop(stream_id, None)

    def cancel(self, stream_id: str) -> None:
        if signal := self._running.get(stream_id):
            signal.stop("cancelled by request")

    async def check_readers_forever(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            if not self._running:
                continue
            ids = list(self._running)
            try:
                seen = await self._redis.zmscore(READERS_KEY, ids)
            except (RedisError, OSError) as exc:
                log.warning("could not check readers: %s", exc)
                continue
            now = now_ms()
            for stream_id, last in zip(ids, seen, strict=True):
                signal = self._running.get(stream_id)
                if signal is None:
                    continue
                if last is not None and now - last <= self._reader_ttl_ms:
                    signal.last_read_ms = now
                elif now - signal.last_read_ms > self._grace_ms:
                    signal.stop("no client was reading the stream")
