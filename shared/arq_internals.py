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

import json
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.worker import Worker

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


MAX_SCAN = 10_000
"""Queue entries one claim looks at: far more than the jobs running at once in a deployment."""


class ClaimingWorker(Worker):
    """arq's Worker with its poll replaced by one claim script (shared/lua/claim_jobs.lua), over
    `waiting_key`: the jobs of its queue no worker has taken, which sluice's enqueue writes
    beside arq's queue (a job arq's own `enqueue_job` writes is not in it).

    What arq's `_poll_iteration` also does is kept: reaping finished job tasks (re-raising what
    they raised) and arq's health-check record. Job aborts (`allow_abort_jobs`) and burst mode
    are arq features sluice does not use; they are refused at construction, as is any job
    serializer but JSON's.
    """

    def __init__(self, *, waiting_key: str, orphan_after_ms: int, **kwargs: Any) -> None:
        self.waiting_key = waiting_key
        self.orphan_after_ms = orphan_after_ms
        """A job taken whose stream is not claimed by then is an orphan (shared/lua)."""
        if {"job_serializer", "job_deserializer"} & set(kwargs):
            raise ValueError("ClaimingWorker reads JSON job records only (see job_deserializer)")
        super().__init__(job_serializer=job_serializer, job_deserializer=job_deserializer, **kwargs)
        if self.allow_abort_jobs or self.burst:
            raise ValueError("ClaimingWorker supports neither allow_abort_jobs nor burst")
        self._claim_script: Any = None

    async def _poll_iteration(self) -> None:
        free = self.max_jobs - self.job_counter
        if self.allow_pick_jobs and free > 0:
            await self._claim(free)
        for arq_job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[arq_job_id]
                task.result()
        await self.heart_beat()

    async def _claim(self, free: int) -> None:
        if self._claim_script is None:
            self._claim_script = self.pool.register_script(lua("claim_jobs"))
        claimed = await self._claim_script(
            keys=[self.waiting_key],
            args=[
                in_progress_key_prefix,
                free,
                int(self.in_progress_timeout_s * 1000),
                MAX_SCAN,
                self.orphan_after_ms,
            ],
        )
        for raw_id, score in zip(claimed[::2], claimed[1::2], strict=True):
            await self.sem.acquire()  # free: the slots were counted above
            self.job_counter += 1
            arq_job_id = raw_id.decode()
            task = self.loop.create_task(self.run_job(arq_job_id, int(float(score))))
            task.add_done_callback(lambda _: self._job_done())
            self.tasks[arq_job_id] = task

    def _job_done(self) -> None:
        """A job's task ended: arq's own bookkeeping, then `on_slot_free`."""
        self._release_sem_dec_counter_on_complete()
        self.on_slot_free()

    def on_slot_free(self) -> None:
        """Called when a job ends; subclasses may look at the queue again at once."""
