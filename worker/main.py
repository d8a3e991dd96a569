"""The arq worker process: loads the backend once, picks up jobs the moment they are enqueued,
and publishes a heartbeat so the API knows it is alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func

from shared.protocol import JOB_FUNCTION, QUEUE_NAME, WAKE_CHANNEL, WORKERS_KEY, worker_ttl_ms
from shared.settings import Settings
from worker.backends import load_backend
from worker.generate import generate
from worker.writer import StreamWriter

log = logging.getLogger("sluice.worker")


def default_max_jobs(settings: Settings) -> int:
    if settings.worker_max_jobs is not None:
        return settings.worker_max_jobs
    return 1 if settings.backend == "llama" else 512


class SluiceWorker(Worker):
    """arq's worker, with two changes.

    Pickup: arq sleeps `poll_delay` (0.5 s by default) between polls of the queue, which a job
    waits out before it starts. Here the poll loop instead waits on an event set by a Pub/Sub
    message that the API publishes after each enqueue, or by a job finishing; `poll_delay_s` is
    only the fallback period. Idle workers cost Redis one command per period, not a busy loop.

    Liveness: a heartbeat in `sluice:workers` every `heartbeat_s`, read by the API.
    """

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._wake = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        options: dict[str, Any] = {
            "functions": [func(generate, name=JOB_FUNCTION)],
            "queue_name": QUEUE_NAME,
            "redis_settings": RedisSettings.from_dsn(settings.redis_url),
            "on_startup": self._startup,
            "on_shutdown": self._shutdown,
            "max_jobs": default_max_jobs(settings),
            "job_timeout": settings.job_timeout_s,
            "keep_result": 0,
            "max_tries": 2,
            "poll_delay": 0,
            "ctx": {"settings": settings, "worker_id": self.worker_id},
        }
        super().__init__(**{**options, **overrides})

    async def _startup(self, ctx: dict[str, Any]) -> None:
        ctx["backend"] = load_backend(self.settings)
        ctx["writer"] = StreamWriter(ctx["redis"], self.settings.stream_maxlen)
        self._background = [
            asyncio.create_task(self._listen_for_wakeups()),
            asyncio.create_task(self._beat()),
        ]
        log.info("worker %s ready: backend %s", self.worker_id, self.settings.backend)

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.pool.zrem(WORKERS_KEY, self.worker_id)
        ctx["backend"].close()

    async def _poll_iteration(self) -> None:
        await super()._poll_iteration()
        if self.burst:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_delay_s)
        self._wake.clear()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: look at the queue now

    async def _listen_for_wakeups(self) -> None:
        while True:
            try:
                async with self.pool.pubsub() as pubsub:
                    await pubsub.subscribe(WAKE_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wake-up channel lost (%s); retrying", exc)
                await asyncio.sleep(self.settings.poll_delay_s)

    async def _beat(self) -> None:
        ttl = worker_ttl_ms(self.settings.heartbeat_s)
        while True:
            try:
                now = int(time.time() * 1000)
                async with self.pool.pipeline(transaction=False) as pipe:
                    pipe.zadd(WORKERS_KEY, {self.worker_id: now})
                    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - ttl)
                    pipe.pexpire(WORKERS_KEY, ttl)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_s)


def run(settings: Settings) -> None:
    SluiceWorker(settings).run()
