"""Everything sluice takes from arq beyond its public API, in one place.

arq is our queue: a sorted set of job ids scored by when they may run (`queue_name`), a record
per job (`arq:job:<id>`, arq's serialized job), and an in-progress key per claimed job
(`arq:in-progress:<id>`, set by the worker that claims it; running jobs stay in the queue until
they finish). The API writes job records itself (to admit and enqueue in one script), and the
worker replaces arq's poll loop. Both rely on the details below, checked against the pinned arq
by tests/test_arq_contract.py: if arq changes them, that test fails before anything else does.

Job records are JSON, never arq's default pickle: unpickling runs whatever the bytes say, so
write access to Redis would be code execution on every worker (issue 13). A record that is not
JSON fails its job, unread, and the worker carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw, serialize_job
from arq.utils import ms_to_datetime
from arq.worker import Worker

from shared.batched_script import BatchedScript
from shared.scripts import lua

ARQ_VERSION = "0.28.0"
"""The arq these internals were read from (pyproject pins it)."""


def job_key(arq_job_id: str) -> str:
    return job_key_prefix + arq_job_id


def in_progress_key(arq_job_id: str) -> str:
    return in_progress_key_prefix + arq_job_id


def _exception_text(value: object) -> str:
    """arq serializes a failed job's exception as its result; JSON has no type for it."""
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    raise TypeError(f"{type(value).__name__} is not JSON")


def job_serializer(data: dict[str, Any]) -> bytes:
    """arq's job and result records as JSON (arq's `job_serializer`)."""
    return json.dumps(data, separators=(",", ":"), default=_exception_text).encode()


def job_deserializer(raw: bytes) -> dict[str, Any]:
    """arq's job and result records from JSON (arq's `job_deserializer`); anything else raises,
    and arq fails the job (a job's arguments come back as a list, not a tuple)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("an arq record is a JSON object")
    return data


def job_record(function: str, args: tuple[Any, ...], enqueue_time_ms: int) -> bytes:
    """A job as arq's `enqueue_job` stores it, for a worker's `run_job` to read."""
    return serialize_job(function, args, {}, None, enqueue_time_ms, serializer=job_serializer)


log = logging.getLogger("sluice.worker")

MAX_SCAN = 10_000
"""Queue entries one claim looks at: far more than the jobs running at once in a deployment."""
MAX_CLAIM = 64
"""The most jobs one claim call takes (a millisecond or two of Redis's time, which every other
client waits out); a worker with more room calls again at once."""
CLAIMED = "claimed"
"""Where a job's context (`ctx`) holds its `Claimed`."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job as the claim took it (shared/lua/claim_jobs.lua): its record, and its stream's
    claim (shared/lua/lib/claim.lua): the outcome, when (Redis's clock, ms), the entries its
    stream held then, and the name of this run's claim."""

    job_id: str
    score: int
    record: bytes | None
    outcome: str
    at_ms: int
    entries: int
    claim: str

    @property
    def holds_stream(self) -> bool:
        """Whether the claim made the stream this worker's ('claimed' or 'cancelled'; not
        'gone', nor 'refused', which is an orphan already)."""
        return self.outcome in ("claimed", "cancelled")


class ClaimingWorker(Worker):
    """arq's Worker with its poll replaced by one claim script (shared/lua/claim_jobs.lua), over
    `waiting_key`: the jobs of its queue no worker has taken, which sluice's enqueue writes
    beside arq's queue (a job arq's own `enqueue_job` writes is not in it). The claim also
    claims each job's stream for `worker_id` (its attempts in `attempts_key`, due at
    `job_deadline_ms`) and brings the job's record, so a job starts with no round trip of its
    own: its function finds the `Claimed` in its context (`ctx[CLAIMED]`).

    What arq's `_poll_iteration` also does is kept: reaping finished job tasks (re-raising what
    they raised) and arq's health-check record. A job runs as arq's `run_job` runs it, less the
    transaction that opens it (the claim read the record), and less what sluice does not use,
    which is refused at construction: job aborts (`allow_abort_jobs`), burst mode, retries
    (`retry_jobs`), stored results (`keep_result`), job hooks, and any job serializer but JSON's.
    """

    def __init__(
        self,
        *,
        waiting_key: str,
        orphan_after_ms: int,
        worker_id: str,
        attempts_key: str,
        job_deadline_ms: int,
        **kwargs: Any,
    ) -> None:
        self.waiting_key = waiting_key
        self.orphan_after_ms = orphan_after_ms
        """A job taken whose stream Redis refused to claim is an orphan by then (shared/lua)."""
        self.worker_id = worker_id
        self.attempts_key = attempts_key
        self.job_deadline_ms = job_deadline_ms
        if {"job_serializer", "job_deserializer"} & set(kwargs):
            raise ValueError("ClaimingWorker reads JSON job records only (see job_deserializer)")
        super().__init__(job_serializer=job_serializer, job_deserializer=job_deserializer, **kwargs)
        refused = {
            "allow_abort_jobs": self.allow_abort_jobs,
            "burst": self.burst,
            "retry_jobs": self.retry_jobs,
            "keep_result": self.keep_result_s or self.keep_result_forever,
            "job hooks": self.on_job_start or self.on_job_end or self.after_job_end,
        }
        if any(refused.values()):
            raise ValueError(
                f"ClaimingWorker does not support {[k for k, v in refused.items() if v]}"
            )
        self._claim_script: Any = None
        self._finish_script: BatchedScript | None = None
        self.queue_emptied = False
        """Whether the last look at the queue took every job there was (then a job that ends
        need not look again: a job enqueued since publishes its own wake-up)."""

    async def _poll_iteration(self) -> None:
        free = self.max_jobs - self.job_counter
        self.queue_emptied = False
        if self.allow_pick_jobs and free > 0:
            self.queue_emptied = await self._claim(free)
        for arq_job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[arq_job_id]
                task.result()
        await self.heart_beat()

    async def _claim(self, free: int) -> bool:
        """Takes up to `free` jobs; whether that took every job waiting."""
        if self._claim_script is None:
            self._claim_script = self.pool.register_script(lua("claim_jobs"))
        while free > 0:
            asked = min(free, MAX_CLAIM)
            taken = await self._claim_page(asked)
            if taken < asked:
                return True
            free -= taken
        return False

    async def _claim_page(self, most: int) -> int:
        """Takes up to `most` jobs and starts each; how many it took."""
        at_ms, *taken = await self._claim_script(
            keys=[self.waiting_key, self.attempts_key],
            args=[
                in_progress_key_prefix,
                most,
                int(self.in_progress_timeout_s * 1000),
                MAX_SCAN,
                self.orphan_after_ms,
                job_key_prefix,
                self.worker_id,
                self.job_deadline_ms,
                claims := uuid.uuid4().hex,
            ],
        )
        for k, at in enumerate(range(0, len(taken), 5), start=1):
            raw_id, score, record, outcome, entries = taken[at : at + 5]
            await self.sem.acquire()  # free: the slots were counted above
            self.job_counter += 1
            job = Claimed(
                raw_id.decode(),
                int(float(score)),
                record,
                outcome.decode(),
                int(at_ms),
                int(entries),
                f"{claims}:{k}",
            )
            task = self.loop.create_task(self.run_claimed(job))
            task.add_done_callback(lambda _: self._job_done())
            self.tasks[job.job_id] = task
        return len(taken) // 5

    async def run_claimed(self, job: Claimed) -> None:
        """Runs the job's function, as arq's `run_job` would, then closes the job as arq does
        (`finish_job`: its record, in-progress key and queue entry go). A record that is gone
        or unreadable runs nothing (`on_unrunnable`)."""
        try:
            if job.record is None:
                raise ValueError("its record expired")
            name, args, kwargs, _, enqueued_ms = deserialize_job_raw(
                job.record, deserializer=self.job_deserializer
            )
            function = self.functions[name]
        except Exception as exc:  # arq's SerializationError, a function not registered
            log.warning("job %s cannot run: %s", job.job_id, exc)
            self.jobs_failed += 1
            self.on_unrunnable(job)
            await asyncio.shield(self._finish(job.job_id))
            return
        ctx = {
            **self.ctx,
            "job_id": job.job_id,
            "job_try": 1,
            "enqueue_time": ms_to_datetime(enqueued_ms),
            "score": job.score,
            CLAIMED: job,
        }
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await function.coroutine(ctx, *args, **kwargs)
        except (Exception, asyncio.CancelledError) as exc:
            # As arq's run_job without retries: the job is over whatever it raised (a cancel is
            # a shutdown or the job timeout; its function has ended its stream).
            if not isinstance(exc, asyncio.CancelledError):
                log.error("job %s failed", job.job_id, exc_info=exc)
            self.jobs_failed += 1
        else:
            self.jobs_complete += 1
        await asyncio.shield(self._finish(job.job_id))

    async def _finish(self, arq_job_id: str) -> None:
        """arq's `finish_job` for a finished job without a result, in a script whose calls
        share round trips with other jobs' ending meanwhile (shared/batched_script.py)."""
        if self._finish_script is None:
            self._finish_script = BatchedScript(self.pool, lua("finish_job"))
        await self._finish_script(
            keys=[
                in_progress_key(arq_job_id),
                retry_key_prefix + arq_job_id,
                job_key(arq_job_id),
                abort_jobs_ss,
                self.queue_name,
            ],
            args=[arq_job_id],
        )

    def on_unrunnable(self, job: Claimed) -> None:
        """A job taken whose function cannot run; subclasses let go of its stream."""

    def _job_done(self) -> None:
        """A job's task ended: arq's own bookkeeping, then `on_slot_free`."""
        self._release_sem_dec_counter_on_complete()
        self.on_slot_free()

    def on_slot_free(self) -> None:
        """Called when a job ends; subclasses may look at the queue again at once."""
