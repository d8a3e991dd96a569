"""A stream's end, acknowledged by a replica before the client is told (issue 24).

Replication is asynchronous: a master that dies may take with it entries a client has read. A
relay that sends `[DONE]` (or a non-streaming body) after a stream's terminal entry first asks
Redis to `WAIT` for one replica to have everything written so far, the end included, so that a
stream a client saw end survives a failover whole (replication is in order: a replica that has
the end has every entry before it). `WAIT` counts what its own connection wrote, so each wait is
a small write of this process's own (`hub_ack_key`) and a `WAIT`, in one pipeline.

One wait at a time per process serves every relay that asked before it began: under load, one
round trip answers for all the streams that ended meanwhile. A wait that no replica answers
within `wait_ms` is not repeated for `NO_REPLICA_S`: ends then go out at once, as they do
without Sentinels (and the log says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.protocol import hub_ack_key

log = logging.getLogger("sluice.api")
NO_REPLICA_S = 10.0


class ReplicaWait:
    def __init__(self, redis: Redis, wait_ms: int) -> None:
        self._redis = redis
        self._wait_ms = wait_ms
        self._key = hub_ack_key(uuid.uuid4().hex)
        self._running: asyncio.Future[bool] | None = None
        self._next: asyncio.Future[bool] | None = None
        self._skip_until = 0.0

    async def acknowledged(self) -> bool:
        """Whether a replica has everything written before this call, waiting up to `wait_ms`
        for one to; False at once while none answers."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._skip_until:
            return False
        if self._running is None:
            self._running = asyncio.ensure_future(self._round())
            return await asyncio.shield(self._running)
        if self._next is None:  # the one under way began before this call: wait for the next
            self._next = loop.create_future()
        return await asyncio.shield(self._next)

    async def _round(self) -> bool:
        try:
            acknowledged = await self._wait()
        finally:
            self._running = None
        if (waiting := self._next) is not None:
            self._next = None
            self._running = asyncio.ensure_future(self._round())
            self._running.add_done_callback(lambda done: _settle(waiting, done))
        return acknowledged

    async def _wait(self) -> bool:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._key, 1, px=60_000)
                pipe.execute_command("WAIT", 1, self._wait_ms)
                _, replicas = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not wait for a replica: %s", exc)
            return False
        if not replicas:
            log.warning(
                "no replica acknowledged a stream's end within %d ms; ends are not waited for"
                " in the next %g s",
                self._wait_ms,
                NO_REPLICA_S,
            )
            self._skip_until = asyncio.get_running_loop().time() + NO_REPLICA_S
        return bool(replicas)

    async def close(self) -> None:
        if self._running is not None:
            with contextlib.suppress(BaseException):
                await self._running
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._key)


def _settle(future: asyncio.Future[bool], done: asyncio.Future[bool]) -> None:
    if future.done():
        return
    if done.cancelled() or done.exception() is not None:
        future.set_result(False)
    else:
        future.set_result(done.result())
