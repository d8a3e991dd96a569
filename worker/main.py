"""The arq worker process: loads the backend once, picks up jobs the moment they are enqueued,
and publishes a heartbeat so the API knows it is alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.exceptions import RedisError

from shared.protocol import (
    CANCEL_CHANNEL,
    JOB_FUNCTION,
    QUEUE_NAME,
    WAKE_CHANNEL,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
    now_ms,
    worker_ttl_ms,
)
from shared.settings import Settings
from worker.backends import load_backend
from worker.control import JobControl
from worker.generate import CLAIM_SCRIPT, generate
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
            # A cancelled job has written its stream's end; the API, not arq, retries lost jobs.
            "retry_jobs": False,
            "job_completion_wait": settings.drain_s,
            "poll_delay": 0,
            "ctx": {"settings": settings, "worker_id": self.worker_id},
        }
        super().__init__(**{**options, **overrides})

    async def _startup(self, ctx: dict[str, Any]) -> None:
        try:
            ctx["backend"] = load_backend(self.settings)
        except Exception as exc:
            log.critical("worker %s could not load its backend: %s", self.worker_id, exc)
            raise SystemExit(1) from exc
        ctx["writer"] = StreamWriter(ctx["redis"], self.settings.stream_maxlen)
        ctx["claim"] = ctx["redis"].register_script(CLAIM_SCRIPT)
        control = ctx["control"] = JobControl(
            ctx["redis"], self.settings.heartbeat_s, self.settings.resume_grace_s
        )
        self._background = [
            asyncio.create_task(self._listen(control)),
            asyncio.create_task(self._beat()),
            asyncio.create_task(control.check_readers_forever()),
        ]
        log.info("worker %s ready: backend %s", self.worker_id, self.settings.backend)

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.zrem(WORKERS_KEY, self.worker_id)
                pipe.hdel(WORKER_SLOTS_KEY, self.worker_id)
                await pipe.execute()
        if "backend" in ctx:
            ctx["backend"].close()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            # arq would let this end the worker; Redis restarts should not.
            log.warning("queue poll failed: %s", exc)
            await asyncio.sleep(self.settings.poll_delay_s)
            return
        if self.burst:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_delay_s)
        self._wake.clear()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: look at the queue now

    async def _listen(self, control: JobControl) -> None:
        """Wake-ups (a job was enqueued) and cancellations, as they are published."""
        while True:
            try:
                async with self.pool.pubsub() as pubsub:
                    await pubsub.subscribe(WAKE_CHANNEL, CANCEL_CHANNEL)
                    self._wake.set()  # anything enqueued while we were not listening
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        if message["channel"] == CANCEL_CHANNEL.encode():
                            control.cancel(message["data"].decode())
                        else:
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
                now = now_ms()
                dead = await self.pool.zrangebyscore(WORKERS_KEY, "-inf", now - ttl)
                async with self.pool.pipeline(transaction=False) as pipe:
                    pipe.zadd(WORKERS_KEY, {self.worker_id: now})
                    if dead:  # workers that died without saying goodbye
                        pipe.zrem(WORKERS_KEY, *dead)
                        pipe.hdel(WORKER_SLOTS_KEY, *dead)
                    pipe.pexpire(WORKERS_KEY, ttl)
                    pipe.hset(WORKER_SLOTS_KEY, self.worker_id, str(self.max_jobs))
                    pipe.pexpire(WORKER_SLOTS_KEY, ttl)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_s)


def run(settings: Settings) -> None:
    SluiceWorker(settings).run()
