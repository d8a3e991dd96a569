"""What sluice takes from arq beyond its public API (shared/arq_internals.py), checked against the
pinned arq on a real Redis. A failure here means arq changed under us: read
shared/arq_internals.py before changing either side."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import arq
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import abort_jobs_ss, retry_key_prefix
from arq.jobs import Job, JobStatus, deserialize_job, deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Worker, func

from shared.arq_internals import (
    ARQ_VERSION,
    ClaimingWorker,
    in_progress_key,
    job_deserializer,
    job_key,
    job_record,
    job_serializer,
)
from tests.procs import RedisServer, eventually

# arq 0.28's Worker.close calls redis-py's deprecated `close()`: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")

DB = 13
FUNCTION = "hold"
ARGS = ("prompt", {"max_tokens": 3, "stop": ["\n"]})
JOB_TIMEOUT_S = 30


@dataclass
class Gate:
    """The job function's side of a test: which jobs started, and when they may finish."""

    started: dict[str, asyncio.Event] = field(default_factory=dict)
    ran: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def started_event(self, arq_job_id: str) -> asyncio.Event:
        return self.started.setdefault(arq_job_id, asyncio.Event())

    async def hold(self, ctx: dict[str, Any], *args: Any) -> str:
        self.ran.append((ctx["job_id"], args))
        self.started_event(ctx["job_id"]).set()
        await self.release.wait()
        return "done"


WorkerFactory = Callable[..., ClaimingWorker]
StartedWorkerFactory = Callable[..., Awaitable[ClaimingWorker]]


@pytest.fixture
def settings(redis_server: RedisServer) -> RedisSettings:
    return RedisSettings.from_dsn(redis_server.url(DB))


@pytest.fixture
def queue() -> str:
    """A queue of this test's own (the database may hold other tests' leftovers); its job ids
    start with its name, so every key of the test has the name in it."""
    return f"test-arq-contract-{uuid.uuid4().hex}"


def new_job_id(queue: str) -> str:
    return f"{queue}-{uuid.uuid4().hex[:8]}.1"


@pytest.fixture
async def pool(settings: RedisSettings, queue: str) -> AsyncIterator[ArqRedis]:
    client = await create_pool(
        settings,
        default_queue_name=queue,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
    )
    yield client
    keys = [k async for k in client.scan_iter(f"*{queue}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def new_worker(settings: RedisSettings, queue: str, gate: Gate) -> WorkerFactory:
    """A `ClaimingWorker` of `gate.hold` on `queue`, in this loop, not started."""

    def new(**options: Any) -> ClaimingWorker:
        return ClaimingWorker(
            functions=[func(gate.hold, name=FUNCTION)],
            queue_name=queue,
            waiting_key=waiting(queue),
            orphan_after_ms=3000,
            worker_id="contract-worker",
            attempts_key=f"{queue}:attempts",
            job_deadline_ms=60_000,
            redis_settings=settings,
            handle_signals=False,
            job_timeout=JOB_TIMEOUT_S,
            poll_delay=0.02,
            **{"keep_result": 0, "retry_jobs": False, **options},
        )

    return new


@pytest.fixture
async def start_worker(
    new_worker: WorkerFactory, gate: Gate
) -> AsyncIterator[StartedWorkerFactory]:
    """Start a new worker as `arq` runs one; closed (its main task seen cancelled) at the end."""
    running: list[tuple[ClaimingWorker, asyncio.Task[None]]] = []

    async def start(**options: Any) -> ClaimingWorker:
        worker = new_worker(**options)
        running.append((worker, asyncio.create_task(worker.async_run())))
        return worker

    yield start
    gate.release.set()
    for worker, main in running:
        await worker.close()
        with pytest.raises(asyncio.CancelledError):
            await main


def test_installed_arq_is_the_version_the_internals_were_read_from() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert arq.VERSION == ARQ_VERSION
    assert f"arq=={ARQ_VERSION}" in pyproject["project"]["dependencies"]


def test_key_helpers_spell_arqs_key_names() -> None:
    assert job_key("s1.1") == "arq:job:s1.1"
    assert in_progress_key("s1.1") == "arq:in-progress:s1.1"


def test_job_record_reads_back_through_arqs_deserializers() -> None:
    enqueued_ms = 1_767_225_600_123
    record = job_record(FUNCTION, ARGS, enqueued_ms)

    job = deserialize_job(record, deserializer=job_deserializer)
    assert (job.function, tuple(job.args), job.kwargs) == (FUNCTION, ARGS, {})
    assert job.job_try is None  # arq counts tries itself (its retry key)
    assert job.enqueue_time == ms_to_datetime(enqueued_ms)
    # what Worker.run_job itself reads
    function, args, kwargs, job_try, enqueue_time_ms = deserialize_job_raw(
        record, deserializer=job_deserializer
    )
    assert (function, tuple(args), kwargs) == (FUNCTION, ARGS, {})
    assert job_try is None
    assert enqueue_time_ms == enqueued_ms


async def test_arqs_enqueue_job_writes_the_layout_the_claim_script_reads(
    pool: ArqRedis, queue: str
) -> None:
    before = timestamp_ms()
    job = await pool.enqueue_job(FUNCTION, *ARGS, _job_id=new_job_id(queue), _queue_name=queue)
    after = timestamp_ms()
    assert job is not None

    # the queue: a sorted set of job ids scored by when they may run, in ms
    [(member, score)] = await pool.zrange(queue, 0, -1, withscores=True)
    assert member.decode() == job.job_id
    assert before <= score <= after
    assert score == int(score)
    # the record: under job_key, as job_record writes it for the same job
    record = await pool.get(job_key(job.job_id))
    assert record == job_record(FUNCTION, ARGS, int(score))
    assert await pool.pttl(job_key(job.job_id)) > 0
    assert await job.status() == JobStatus.queued


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        (Worker._poll_iteration, ["self"]),
        (
            Worker.finish_job,
            [
                "self",
                "job_id",
                "finish",
                "result_data",
                "result_timeout_s",
                "keep_result_forever",
                "incr_score",
                "keep_in_progress",
            ],
        ),
        (Worker.heart_beat, ["self"]),
        (Worker.main, ["self"]),
        (Worker.async_run, ["self"]),
        (Worker.close, ["self"]),
    ],
    ids=["_poll_iteration", "finish_job", "heart_beat", "main", "async_run", "close"],
)
def test_worker_coroutine_methods_the_claiming_worker_calls_keep_their_signatures(
    method: Callable[..., Any], parameters: list[str]
) -> None:
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters) == parameters


def test_worker_release_of_a_slot_is_a_plain_method_of_no_arguments() -> None:
    release = Worker._release_sem_dec_counter_on_complete
    assert not inspect.iscoroutinefunction(release)
    assert list(inspect.signature(release).parameters) == ["self"]


def test_worker_takes_every_option_sluices_workers_pass() -> None:
    options = inspect.signature(Worker.__init__).parameters
    passed = [
        "functions",
        "queue_name",
        "redis_pool",
        "on_startup",
        "on_shutdown",
        "max_jobs",
        "job_timeout",
        "keep_result",
        "retry_jobs",
        "job_completion_wait",
        "poll_delay",
        "ctx",
        "handle_signals",
        "burst",
        "allow_abort_jobs",
        "job_serializer",
        "job_deserializer",
    ]
    assert [name for name in passed if name not in options] == []


async def test_worker_exposes_the_state_the_claiming_worker_reads_and_writes(
    new_worker: WorkerFactory, queue: str
) -> None:
    max_jobs = 3
    worker = new_worker(max_jobs=max_jobs)

    assert worker.queue_name == queue
    assert worker.max_jobs == max_jobs
    assert worker.job_counter == 0
    assert worker.tasks == {}
    assert worker.in_progress_timeout_s == JOB_TIMEOUT_S + 10
    assert (worker.allow_pick_jobs, worker.allow_abort_jobs, worker.burst) == (True, False, False)
    assert worker.loop is asyncio.get_running_loop()
    # a slot counted free by max_jobs - job_counter is one the semaphore gives without waiting
    for _ in range(max_jobs):
        assert not worker.sem.locked()
        await worker.sem.acquire()
        worker.job_counter += 1
    for _ in range(max_jobs):
        worker._release_sem_dec_counter_on_complete()
    assert worker.job_counter == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("burst", True),
        ("allow_abort_jobs", True),
        ("retry_jobs", True),
        ("keep_result", 60),
        ("keep_result_forever", True),
        ("on_job_start", print),
    ],
)
async def test_claiming_worker_refuses_arq_features_its_claim_does_not_handle(
    new_worker: WorkerFactory, option: str, value: object
) -> None:
    with pytest.raises(ValueError, match=option.removeprefix("on_").split("_")[0]):
        new_worker(**{option: value})


def test_a_registered_function_has_what_the_claiming_worker_runs_it_by() -> None:
    async def job(ctx: dict[str, Any]) -> None:
        pass

    function = func(job, name=FUNCTION)
    assert function.coroutine is job
    assert function.timeout_s is None  # the worker's job_timeout applies


def waiting(queue: str) -> str:
    """The set of the queue's jobs no worker has taken (shared/lua/lib/enqueue.lua)."""
    return f"{queue}:waiting"


async def enqueue_as_sluice_api(pool: ArqRedis, queue: str) -> Job:
    """The API's way (shared/lua/lib/enqueue.lua): the record, then the queue entry, and the
    job among those no worker has taken, which is where the claim looks."""
    arq_job_id = new_job_id(queue)
    now = timestamp_ms()
    await pool.psetex(job_key(arq_job_id), 60_000, job_record(FUNCTION, ARGS, now))
    await pool.zadd(queue, {arq_job_id: now})
    await pool.zadd(waiting(queue), {arq_job_id: now})
    return Job(arq_job_id, pool, _queue_name=queue, _deserializer=job_deserializer)


async def test_claiming_worker_runs_a_queued_job_and_leaves_no_queue_entry_or_claim(
    pool: ArqRedis, queue: str, gate: Gate, start_worker: StartedWorkerFactory
) -> None:
    job = await enqueue_as_sluice_api(pool, queue)
    assert await job.status() == JobStatus.queued

    worker = await start_worker()
    await asyncio.wait_for(gate.started_event(job.job_id).wait(), 10)
    running = worker.tasks[job.job_id]
    assert await job.status() == JobStatus.in_progress
    claim_ttl_ms = await pool.pttl(in_progress_key(job.job_id))
    assert 0 < claim_ttl_ms <= worker.in_progress_timeout_s * 1000
    assert worker.job_counter == 1
    assert await pool.exists(worker.health_check_key)

    gate.release.set()
    await asyncio.wait_for(running, 10)

    assert gate.ran == [(job.job_id, ARGS)]
    assert await job.status() == JobStatus.not_found
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert worker.job_counter == 0
    assert await pool.zcard(queue) == await pool.zcard(waiting(queue)) == 0
    assert not await pool.exists(in_progress_key(job.job_id), job_key(job.job_id))


async def test_a_job_taken_without_its_record_runs_nothing_and_leaves_nothing(
    pool: ArqRedis, queue: str, gate: Gate, start_worker: StartedWorkerFactory
) -> None:
    """arq's run_job fails a job whose record expired; the claiming worker does too (the claim
    brought no record), closes it as arq does, and says so (`on_unrunnable`)."""
    job = await enqueue_as_sluice_api(pool, queue)
    await pool.delete(job_key(job.job_id))
    unrunnable: list[str] = []

    worker = await start_worker()
    worker.on_unrunnable = lambda claimed: unrunnable.append(claimed.job_id)  # type: ignore[method-assign]
    await eventually(lambda: worker.jobs_failed == 1 and worker.job_counter == 0, "the job done")

    assert gate.ran == []
    assert unrunnable == [job.job_id]
    assert await pool.zcard(queue) == await pool.zcard(waiting(queue)) == 0
    assert not await pool.exists(in_progress_key(job.job_id))


async def test_the_finish_script_closes_a_job_as_arqs_finish_job_does(
    pool: ArqRedis, queue: str, new_worker: WorkerFactory
) -> None:
    """The claiming worker closes a job with shared/lua/finish_job.lua, not arq's transaction:
    the same keys go, for the job finished and no other."""
    worker = new_worker(redis_pool=pool)

    async def open_job() -> str:
        job = await enqueue_as_sluice_api(pool, queue)
        await pool.psetex(in_progress_key(job.job_id), 60_000, b"1")
        await pool.psetex(retry_key_prefix + job.job_id, 60_000, b"1")
        await pool.zadd(abort_jobs_ss, {job.job_id: 1})
        return job.job_id

    async def state(arq_job_id: str) -> tuple[object, ...]:
        keys = [in_progress_key(arq_job_id), retry_key_prefix + arq_job_id, job_key(arq_job_id)]
        return (
            *[await pool.exists(key) for key in keys],
            await pool.zscore(queue, arq_job_id) is not None,
            await pool.zscore(abort_jobs_ss, arq_job_id) is not None,
        )

    by_arq, by_script, bystander = await open_job(), await open_job(), await open_job()
    before = await state(bystander)
    await Worker.finish_job(worker, by_arq, True, None, None, False, None, None)
    await worker._finish(by_script)

    assert await state(by_script) == await state(by_arq) == (0, 0, 0, False, False)
    assert await state(bystander) == before == (1, 1, 1, True, True)
    await pool.zrem(abort_jobs_ss, bystander)


@pytest.mark.parametrize(("jobs", "emptied"), [(0, True), (1, True), (2, False), (3, False)])
async def test_the_worker_knows_whether_its_last_claim_took_every_waiting_job(
    pool: ArqRedis,
    queue: str,
    gate: Gate,
    start_worker: StartedWorkerFactory,
    jobs: int,
    emptied: bool,
) -> None:
    """With 2 slots: a job that ends need not look at the queue again after a claim that left
    nothing (sluice's worker then waits for the next enqueue's wake-up)."""
    for _ in range(jobs):
        await enqueue_as_sluice_api(pool, queue)
    worker = await start_worker(max_jobs=2)
    # Jobs enqueued in the same millisecond are taken in no set order: count, don't name them.
    await eventually(lambda: len(gate.ran) == min(jobs, 2), "the jobs there is room for started")
    await eventually(lambda: worker.queue_emptied == emptied, f"queue_emptied {emptied}")
