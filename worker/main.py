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
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
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

# arq's claim (WATCH the in-progress key, check the queue score, set the key), for many jobs in
# one atomic round trip instead of four each. ARGV: in-progress key prefix, now (ms), free
# slots, in-progress TTL (ms), then candidate job ids. Returns claimed ids, each with its score.
CLAIM_JOBS_SCRIPT = """
local claimed = {}
local free = tonumber(ARGV[3])
for i = 5, #ARGV do
  if free <= 0 then break end
  local in_progress = ARGV[1] .. ARGV[i]
  if redis.call('EXISTS', in_progress) == 0 then
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) <= tonumber(ARGV[2]) then
      redis.call('PSETEX', in_progress, ARGV[4], '1')
      table.insert(claimed, ARGV[i])
      table.insert(claimed, score)
      free = free - 1
    end
  end
end
return claimed
"""


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
        self._claim_jobs = ctx["redis"].register_script(CLAIM_JOBS_SCRIPT)
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

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, claiming every job it can in one round trip.

        arq keeps running jobs in the queue, so each poll sees them again; arq spends three
        round trips on each to find it taken (four to claim one), which with hundreds of
        streams open made pickup quadratic. Jobs this worker runs are skipped here; the rest
        are claimed in one script.
        """
        free = self.max_jobs - self.job_counter
        candidates = [i for i in (b.decode() for b in job_ids) if i not in self.tasks]
        if free <= 0 or not candidates:
            return
        claimed = await self._claim_jobs(
            keys=[self.queue_name],
            args=[
                in_progress_key_prefix,
                timestamp_ms(),
                free,
                int(self.in_progress_timeout_s * 1000),
                *candidates,
            ],
        )
        for raw_id, score in zip(claimed[::2], claimed[1::2], strict=True):
            await self.sem.acquire()  # free: the slots were counted above
            self.job_counter += 1
            job_id = raw_id.decode()
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

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
    # uvloop, as uvicorn gives the API: a worker streaming thousands of tokens a second spends
    # much of its time in the event loop's timers and socket writes, which uvloop does in C.
    asyncio.set_event_loop(uvloop.new_event_loop())
    SluiceWorker(settings).run()
