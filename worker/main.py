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

import uvloop
from arq.worker import func
from redis.exceptions import RedisError

from shared.arq_internals import ClaimingWorker
from shared.loops import LoopGroup
from shared.protocol import (
    CANCEL_CHANNEL,
    JOB_FUNCTION,
    QUEUE_NAME,
    REDIS_NOW_LUA,
    WAKE_CHANNEL,
    WORKER_BUSY_KEY,
    WORKER_LOOPS_KEY,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
    worker_ttl_ms,
)
from shared.redis_url import arq_redis_settings
from shared.settings import Settings
from worker import metrics
from worker.backends import load_backend
from worker.control import JobControl
from worker.generate import CLAIM_SCRIPT, generate
from worker.writer import StreamWriter

log = logging.getLogger("sluice.worker")

# A heartbeat, by Redis's clock: this worker's score, its slots and the state of its loops;
# workers not heard from for a TTL are dropped (they died without saying goodbye).
# KEYS: workers, worker slots, worker loops, worker busy. ARGV: worker id, TTL (ms), slots,
# failing loops, jobs running.
HEARTBEAT_SCRIPT = (
    REDIS_NOW_LUA
    + """
local now = redis_now_ms()
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
for _, worker in ipairs(dead) do
  redis.call('ZREM', KEYS[1], worker)
  redis.call('HDEL', KEYS[2], worker)
  redis.call('HDEL', KEYS[3], worker)
  redis.call('HDEL', KEYS[4], worker)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[2]) end
return #dead
"""
)


def default_max_jobs(settings: Settings) -> int:
    if settings.worker_max_jobs is not None:
        return settings.worker_max_jobs
    if settings.backend == "llama":
        from worker.backends.llama import DEFAULT_SEQUENCES  # llama.cpp loads only for llama

        return DEFAULT_SEQUENCES  # its jobs are decoded together, one sequence each
    return 512


class SluiceWorker(ClaimingWorker):
    """arq's worker (claiming as `ClaimingWorker` does), woken instead of polling.

    Pickup: arq sleeps `poll_delay` (0.5 s by default) between polls of the queue, which a job
    waits out before it starts. Here the poll loop instead waits on an event set by a Pub/Sub
    message that the API publishes after each enqueue, or by a job finishing; `poll_delay_s` is
    only the fallback period. Idle workers cost Redis one command per period, not a busy loop.

    Liveness: a heartbeat in `sluice:workers` every `heartbeat_s`, by Redis's clock.
    """

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._wake = asyncio.Event()
        self._loops = LoopGroup(log)
        options: dict[str, Any] = {
            "functions": [func(generate, name=JOB_FUNCTION)],
            "queue_name": QUEUE_NAME,
            "redis_settings": arq_redis_settings(settings.redis_url),
            "on_startup": self._startup,
            "on_shutdown": self._shutdown,
            "max_jobs": default_max_jobs(settings),
            "job_timeout": settings.job_timeout_s,
            "keep_result": 0,
            # A cancelled job has written its stream's end; the supervisor retries lost jobs.
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
        metrics.serve(self.settings.worker_metrics_port)
        ctx["claim"] = ctx["redis"].register_script(CLAIM_SCRIPT)
        self._heartbeat = ctx["redis"].register_script(HEARTBEAT_SCRIPT)
        control = ctx["control"] = JobControl()
        # Alive before it claims anything: the supervisor retries jobs of workers not beating.
        await self._beat_once()
        self._loops.start("listen", lambda: self._listen(control))
        self._loops.start("heartbeat", self._beat)
        log.info("worker %s ready: backend %s", self.worker_id, self.settings.backend)

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        await self._loops.stop()
        with contextlib.suppress(Exception):
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.zrem(WORKERS_KEY, self.worker_id)
                pipe.hdel(WORKER_SLOTS_KEY, self.worker_id)
                pipe.hdel(WORKER_LOOPS_KEY, self.worker_id)
                pipe.hdel(WORKER_BUSY_KEY, self.worker_id)
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_delay_s)
        self._wake.clear()

    def on_slot_free(self) -> None:
        self._wake.set()  # a slot is free: look at the queue now

    async def _listen(self, control: JobControl) -> None:
        """Wake-ups (a job was enqueued) and stops (cancel, unread), as they are published.
        A lost subscription raises, and the loop's supervisor subscribes again."""
        async with self.pool.pubsub() as pubsub:
            await pubsub.subscribe(WAKE_CHANNEL, CANCEL_CHANNEL)
            self._wake.set()  # anything enqueued while we were not listening
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                if message["channel"] == CANCEL_CHANNEL.encode():
                    control.stop(message["data"].decode())
                else:
                    self._wake.set()

    async def _beat_once(self) -> None:
        await self._heartbeat(
            keys=[WORKERS_KEY, WORKER_SLOTS_KEY, WORKER_LOOPS_KEY, WORKER_BUSY_KEY],
            args=[
                self.worker_id,
                worker_ttl_ms(self.settings.heartbeat_s),
                self.max_jobs,
                ",".join(loop.name for loop in self._loops.failing()),
                self.job_counter,
            ],
        )

    async def _beat(self) -> None:
        while True:
            try:
                await self._beat_once()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_s)


def run(settings: Settings) -> None:
    # uvloop, as uvicorn gives the API: a worker streaming thousands of tokens a second spends
    # much of its time in the event loop's timers and socket writes, which uvloop does in C.
    asyncio.set_event_loop(uvloop.new_event_loop())
    SluiceWorker(settings).run()
