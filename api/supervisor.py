"""The one owner of job supervision, whoever is connected.

Every API process runs a `Supervisor`; one of them holds the lease (`SUPERVISOR_KEY`) and does
the work, and another takes over within a lease TTL if that process dies or stalls. Each period
one script (shared/lua/supervise.lua), by Redis's clock, decides what becomes of every active
stream from its state: queued, running, lost or ended, as the table in README's "The life of a
stream" says, and as the script's `decide` table is laid out. It ends streams itself; a lost
attempt it returns, to be tried again here (shared/lua/retry.lua).

Every end is a fenced append (shared/lua/lib/fenced_append.lua), so the worker that was presumed
dead cannot write after it, and a stale supervisor's decision cannot land after a newer one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.jobs import JobQueue
from shared.arq_internals import job_key
from shared.errors import Cancelled, GenerationFailed, QueueTimeout, SluiceError, WorkerLost
from shared.protocol import (
    CANCEL_CHANNEL,
    MAX_ATTEMPTS,
    QUEUE_PREFIX,
    READERS_KEY,
    SUPERVISOR_KEY,
    WAITING_PREFIX,
    Failed,
    attempt_number,
    encode,
    job_deadline_ms,
    worker_ttl_ms,
)
from shared.redis_url import master_watch
from shared.scripts import lua
from shared.settings import Settings

log = logging.getLogger("sluice.api")
TELL_AGAIN_MS = 1000
"""How often the worker of a running stream nobody reads is told again to stop."""
MOST_PER_TICK = 1000
"""Streams one tick takes from each of its indexes: a tick never holds Redis for long."""


def _payload(error: SluiceError) -> str:
    return encode(Failed(error.body()))[1]


class Supervisor:
    def __init__(self, redis: Redis, queue: JobQueue, settings: Settings) -> None:
        self._redis = redis
        self._queue = queue
        self._settings = settings
        self._script = redis.register_script(lua("supervise"))
        self.instance_id = uuid.uuid4().hex
        self._redis_lost = False
        self._sentinel_pool = master_watch(redis)
        self._masters_seen = 0
        worker_ttl = worker_ttl_ms(settings.heartbeat_s)
        self._args: list[str | int] = [
            self.instance_id,
            max(int(settings.supervise_s * 5000), 2000),
            worker_ttl,
            worker_ttl,  # readers refresh as often as workers beat
            int(settings.resume_grace_s * 1000),
            int(settings.queue_timeout_s * 1000),
            job_deadline_ms(settings.job_timeout_s, settings.heartbeat_s),
            TELL_AGAIN_MS,
            settings.stream_ttl_s,
            MAX_ATTEMPTS,
            MOST_PER_TICK,
            job_key(""),
            QUEUE_PREFIX,
            WAITING_PREFIX,
            CANCEL_CHANNEL,
            _payload(Cancelled("no client was reading; the request was withdrawn")),
            _payload(
                QueueTimeout(
                    f"no worker started this request within {settings.queue_timeout_s:g} s"
                )
            ),
            _payload(WorkerLost("the worker generating this stream stopped")),
            _payload(
                GenerationFailed(
                    f"generation ran past the {settings.job_timeout_s:g} s job timeout"
                )
            ),
            _payload(
                WorkerLost(f"the worker generating this stream stopped, {MAX_ATTEMPTS} times")
            ),
        ]

    async def run(self) -> None:
        """Supervise every `supervise_s` for ever (a `SupervisedLoop` restarts it if it fails).

        After Redis failed (a restart, a failover to a replica that lacks the last heartbeats),
        workers and readers are judged only once they have had a worker TTL to beat on it again:
        else the first look would find every heartbeat stale and end every stream as lost."""
        if self._redis_lost:
            await self._until_redis_answers()
            await self._let_everyone_beat()
            self._redis_lost = False
        while True:
            if self._sentinel_pool and self._sentinel_pool.master_changes != self._masters_seen:
                await self._let_everyone_beat()  # a new master, which the old one fed till now
            try:
                await self.tick()
            except (RedisError, OSError):
                self._redis_lost = True
                raise
            await asyncio.sleep(self._settings.supervise_s)

    async def _let_everyone_beat(self) -> None:
        if self._sentinel_pool is not None:
            self._masters_seen = self._sentinel_pool.master_changes
        await asyncio.sleep(worker_ttl_ms(self._settings.heartbeat_s) / 1000)

    async def _until_redis_answers(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.ping()
                return
            await asyncio.sleep(self._settings.supervise_s)

    async def tick(self) -> None:
        retry = await self._script(
            keys=[SUPERVISOR_KEY, READERS_KEY],
            args=self._args,
        )
        for raw_id, raw_job, raw_model in zip(retry[::3], retry[1::3], retry[2::3], strict=True):
            stream_id, dead_job = raw_id.decode(), raw_job.decode()
            log.warning("stream %s lost its worker before any token; retrying", stream_id)
            await self._queue.retry(
                stream_id, dead_job, attempt_number(dead_job) + 1, raw_model.decode()
            )
