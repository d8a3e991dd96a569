"""Jobs deep in the queue still start: arq's poll reads only the first `max(5 * max_jobs, 100)`
due entries of the queue, and a running job's entry stays there until it ends, so behind 100
running jobs a one-slot worker with its slot free sees nothing to run (our claim,
shared/lua/claim_jobs.lua, scans past claimed entries instead).

Fewer than 100 jobs running never hide a waiting one: 40 one-slot workers alone leave 60 waiting
entries in every worker's window. So the 100 running jobs ahead here are one wide worker's, and
the waiting jobs behind them must still start on 40 one-slot workers as their slots free.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
import redis

from shared.arq_internals import in_progress_key
from shared.protocol import queue_name
from tests.faults.conftest import StackFactory
from tests.procs import Stack, eventually
from tests.sse import SSEResult, stream

ARQ_WINDOW = 100
"""The queue entries arq's poll reads for a one-slot worker: max(5 * 1, 100)."""
ONE_SLOT_WORKERS = 40
WAITING = 120

# ~280 tokens at 2 tokens/s: the wide worker's jobs outlast the test.
LONG = {"prompt": " ".join(["long"] * 200), "max_tokens": 1000, "stream": True}
SHORT = {"prompt": "short", "max_tokens": 2, "stream": True}


@pytest.fixture
def stack(make_stack: StackFactory) -> Stack:
    """An API and one worker with `ARQ_WINDOW` slots; one-slot workers are added by the test."""
    stack = make_stack(
        workers=0,
        worker_max_jobs="1",
        synthetic_tokens_per_s="100",
        max_queue="1000",
        queue_timeout_s="20",  # a job arq's window hides ends `queue_timeout` in this time
        heartbeat_s="1",  # 42 processes on a small machine: no worker presumed dead by mistake
        drain_s="0",
    )
    stack.add_worker(SLUICE_WORKER_MAX_JOBS=str(ARQ_WINDOW), SLUICE_SYNTHETIC_TOKENS_PER_S="2")
    stack.wait_ready(1)
    return stack


@pytest.fixture
def db(stack: Stack) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(stack.redis_url) as client:
        yield client


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60, limits=limits) as c:
        yield c


@pytest.fixture
async def readers(client: httpx.AsyncClient) -> AsyncIterator[list[asyncio.Task[SSEResult]]]:
    """Streams read in the background; hung up on at the end of the test."""
    tasks: list[asyncio.Task[SSEResult]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def running_jobs(db: redis.Redis) -> int:
    """Queue entries a worker has claimed."""
    ids = cast(list[bytes], db.zrange(queue_name("synthetic"), 0, -1))
    return cast(int, db.exists(*(in_progress_key(i.decode()) for i in ids))) if ids else 0


async def test_waiting_jobs_behind_a_window_of_running_jobs_start_on_free_one_slot_workers(
    stack: Stack,
    db: redis.Redis,
    client: httpx.AsyncClient,
    readers: list[asyncio.Task[SSEResult]],
) -> None:
    def read(body: dict[str, Any]) -> asyncio.Task[SSEResult]:
        readers.append(asyncio.create_task(stream(client, body)))
        return readers[-1]

    long_streams = [read(LONG) for _ in range(ARQ_WINDOW)]
    await eventually(lambda: running_jobs(db) == ARQ_WINDOW, "the wide worker to run 100 jobs")
    for _ in range(ONE_SLOT_WORKERS):
        stack.add_worker()
    await asyncio.to_thread(stack.wait_ready, 1 + ONE_SLOT_WORKERS, 90)

    # Every one of these sits behind the 100 running entries: outside arq's window.
    results = await asyncio.gather(*(read(SHORT) for _ in range(WAITING)))

    assert [r.errors for r in results if r.errors] == []
    assert {r.text for r in results} == {"You asked:"}
    assert running_jobs(db) == ARQ_WINDOW
    assert not any(s.done() for s in long_streams)
