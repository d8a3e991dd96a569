"""The arq worker process: loads the backend once, picks up jobs the moment they are enqueued,
and publishes a heartbeat so the API knows it is alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import uvloop
from arq.worker import func
from redis.exceptions import RedisError

from shared import heap
from shared.arq_internals import Claimed, ClaimingWorker
from shared.loops import LoopGroup
from shared.protocol import (
    CANCEL_CHANNEL,
    JOB_FUNCTION,
    MODELS_KEY,
    WORKER_BUSY_KEY,
    WORKER_LOOPS_KEY,
    WORKER_MODELS_KEY,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
    job_deadline_ms,
    jobs_key,
    new_worker_id,
    queue_name,
    serving_key,
    waiting_key,
    wake_channel,
    worker_ttl_ms,
)
from shared.redis_url import master_watch, worker_redis
from shared.scripts import lua
from shared.settings import Settings
from worker import metrics
from worker.backends import Backend, load_backend
from worker.context import CONTEXT, WorkerContext
from worker.control import JobControl
from worker.generate import generate
from worker.writer import StreamWriter

log = logging.getLogger("sluice.worker")
REDIS_START_WAIT_S = 30.0
"""How long a starting worker waits for Redis to answer before it gives up (exit 1)."""

WORKER_HASHES = [WORKER_SLOTS_KEY, WORKER_LOOPS_KEY, WORKER_BUSY_KEY, WORKER_MODELS_KEY]
"""The per-worker hashes, in the order shared/lua/heartbeat.lua takes them."""


class SluiceWorker(ClaimingWorker):
    """arq's worker (claiming as `ClaimingWorker` does), woken instead of polling.

    Pickup: arq sleeps `poll_delay` (0.5 s by default) between polls of the queue, which a job
    waits out before it starts. Here the poll loop instead waits on an event set by a Pub/Sub
    message that the API publishes after each enqueue, or by a job finishing; `poll_delay_s` is
    only the fallback period. Idle workers cost Redis one command per period, not a busy loop.

    Liveness: a heartbeat in `sluice:workers` every `heartbeat_s`, by Redis's clock.

    Routing: it serves its backend's model, from that model's queue; while its backend is not
    available it claims nothing, and its heartbeat says so.
    """

    def __init__(self, settings: Settings, backend: Backend, **overrides: Any) -> None:
        self.settings = settings
        self.backend = backend
        self.worker_id = new_worker_id()
        self._wake = asyncio.Event()
        self._loops = LoopGroup(log)
        self._control = JobControl()
        # Its set of attempts, and the workers' set, outlive its last beat: the supervisor buries
        # a worker that died, and its attempts become orphans.
        self._jobs_ttl_ms = 2 * job_deadline_ms(settings.job_timeout_s, settings.heartbeat_s)
        options: dict[str, Any] = {
            "functions": [func(generate, name=JOB_FUNCTION)],
            "queue_name": queue_name(backend.model),
            "waiting_key": waiting_key(backend.model),
            "orphan_after_ms": worker_ttl_ms(settings.heartbeat_s),
            "worker_id": self.worker_id,
            "attempts_key": jobs_key(self.worker_id),
            "job_deadline_ms": job_deadline_ms(settings.job_timeout_s, settings.heartbeat_s),
            "redis_pool": worker_redis(settings, self.worker_id),
            "on_startup": self._startup,
            "on_shutdown": self._shutdown,
            "max_jobs": backend.max_concurrency,  # SLUICE_WORKER_MAX_JOBS, else its own default
            "job_timeout": settings.job_timeout_s,
            "keep_result": 0,
            # A cancelled job has written its stream's end; the supervisor retries lost jobs.
            "retry_jobs": False,
            "job_completion_wait": settings.drain_s,
            "poll_delay": 0,
        }
        super().__init__(**{**options, **overrides})
        self._sentinel_pool = master_watch(self.pool)
        self._masters_seen = 0
        self._redis_lost = False
        self._bury_from = 0.0
        """Before this (the loop's clock), its heartbeats bury no worker (`_beat_once`)."""

    async def main(self) -> None:
        await self._wait_for_redis()
        await super().main()

    async def _wait_for_redis(self) -> None:
        """A worker started beside Redis (compose, `sluice dev`, a pod) may be up first; arq's
        own pool waits for it, and so does this one, instead of exiting at its first command."""
        deadline = asyncio.get_running_loop().time() + REDIS_START_WAIT_S
        while True:
            try:
                await self.pool.ping()
                return
            except (RedisError, OSError) as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                log.warning("Redis does not answer yet (%s); trying again", exc)
                await asyncio.sleep(0.5)

    async def _startup(self, ctx: dict[str, Any]) -> None:
        redis = ctx["redis"]
        ctx[CONTEXT] = WorkerContext(
            settings=self.settings,
            backend=self.backend,
            worker_id=self.worker_id,
            writer=StreamWriter(
                redis,
                retry_s=self.settings.redis_retry_s,
                loaded_interval_s=self.settings.loaded_write_interval_s,
            ),
            control=self._control,
            claim=redis.register_script(lua("claim_stream")),
            hand_back=redis.register_script(lua("hand_back")),
        )
        self._heartbeat = redis.register_script(lua("heartbeat"))
        metrics.serve(self.settings.worker_metrics_port)
        # Alive before it claims anything: the supervisor retries jobs of workers not beating.
        await self._beat_once()
        self._loops.start("listen", lambda: self._listen(self._control))
        self._loops.start("heartbeat", self._beat)
        if self._sentinel_pool is not None:
            self._loops.start("redis-master", self._sentinel_pool.watch_master)
        log.info(
            "worker %s ready: backend %s, model %s",
            self.worker_id,
            self.settings.backend,
            self.backend.model,
        )

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        await self._loops.stop()
        with contextlib.suppress(Exception):
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.zrem(WORKERS_KEY, self.worker_id)
                for key in WORKER_HASHES:
                    pipe.hdel(key, self.worker_id)
                pipe.zrem(serving_key(self.backend.model), self.worker_id)
                pipe.delete(jobs_key(self.worker_id))
                await pipe.execute()
        self.backend.close()

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

    async def _claim(self, free: int) -> bool:
        if self.backend.available:  # else its jobs wait for workers whose backend answers
            return await super()._claim(free)
        return False

    def on_slot_free(self) -> None:
        if not self.queue_emptied:  # jobs may wait for the slot: look at the queue now
            self._wake.set()

    def on_unrunnable(self, job: Claimed) -> None:
        if job.holds_stream:  # its stream waits on it: the supervisor's to see to now
            self._control.let_go(job.job_id)

    async def _listen(self, control: JobControl) -> None:
        """Wake-ups (a job was enqueued) and stops (cancel, unread), as they are published.
        A lost subscription raises, and the loop's supervisor subscribes again."""
        async with self.pool.pubsub() as pubsub:
            await pubsub.subscribe(wake_channel(self.backend.model), CANCEL_CHANNEL)
            self._wake.set()  # anything enqueued while we were not listening
            while True:
                # A wait of its own: with Sentinels the connection has a socket timeout, which
                # a quiet subscription would otherwise run into (and fail the loop) every time.
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                if message["channel"] == CANCEL_CHANNEL.encode():
                    control.stop(message["data"].decode())
                else:
                    self._wake.set()

    async def _beat_once(self) -> None:
        backend = self.backend
        loop = asyncio.get_running_loop()
        ttl_s = worker_ttl_ms(self.settings.heartbeat_s) / 1000
        changes = self._sentinel_pool.master_changes if self._sentinel_pool else 0
        if self._redis_lost or changes != self._masters_seen:
            # Redis came back, or is a promoted replica: the beats it has of other workers (and
            # of this one) may be older than they are. It buries nobody until all had a TTL.
            self._masters_seen = changes
            self._bury_from = loop.time() + ttl_s
        let_go = self._control.to_report()
        await self._heartbeat(
            keys=[
                WORKERS_KEY,
                *WORKER_HASHES,
                serving_key(backend.model),
                MODELS_KEY,
                jobs_key(self.worker_id),
            ],
            args=[
                self.worker_id,
                worker_ttl_ms(self.settings.heartbeat_s),
                self.max_jobs,
                ",".join(loop.name for loop in self._loops.failing()),
                self.job_counter,
                backend.model,
                int(backend.available),
                "" if backend.n_ctx is None else backend.n_ctx,
                self._jobs_ttl_ms,
                int(loop.time() >= self._bury_from),
                *let_go,
            ],
        )
        if self._redis_lost:
            self._redis_lost = False
            self._bury_from = loop.time() + ttl_s  # from the first beat that landed
        self._control.reported(let_go)

    async def _beat(self) -> None:
        while True:
            try:
                await self._beat_once()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
                self._redis_lost = True
            await asyncio.sleep(self.settings.heartbeat_s)


def run(settings: Settings) -> None:
    # uvloop, as uvicorn gives the API: a worker streaming thousands of tokens a second spends
    # much of its time in the event loop's timers and socket writes, which uvloop does in C.
    asyncio.set_event_loop(uvloop.new_event_loop())
    # Loaded before the worker is built: its model names the queue it serves.
    try:
        backend = load_backend(settings)
    except Exception as exc:
        log.critical("worker could not load its backend: %s", exc)
        sys.exit(1)
    worker = SluiceWorker(settings, backend)
    heap.settle(settings.gc_threshold)
    worker.run()
