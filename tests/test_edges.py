"""Faults at the edges: Redis unreachable, no workers, nobody picks the job up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import redis

from shared.protocol import queue_name
from tests.procs import (
    Proc,
    RedisServer,
    Stack,
    eventually,
    free_port,
    sluice_env,
    start_api,
    start_stack,
)
from tests.sse import stream

SEED = {"prompt": "hello", "stream": True}


@pytest.fixture(scope="module")
def api_without_redis() -> Iterator[str]:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    api, url = start_api("no-redis", sluice_env(dead_redis, free_port(), backend="synthetic"))
    yield url
    api.stop()


@pytest.fixture(scope="module")
def api_without_workers(redis_server: RedisServer) -> Iterator[tuple[Proc, str]]:
    env = sluice_env(redis_server.url(4), free_port(), backend="synthetic")
    api, url = start_api("no-workers", env)
    yield api, url
    api.stop()


@pytest.fixture(scope="module")
def one_slow_slot(redis_server: RedisServer) -> Iterator[Stack]:
    """One worker that serves one job at a time, slowly; the API gives up on a queued job fast."""
    stack = start_stack(
        "one-slot",
        redis_server.url(3),
        1,
        backend="synthetic",
        synthetic_tokens_per_s="25",
        worker_max_jobs="1",
        queue_timeout_s="1",
        stream_ttl_s="2",
        supervise_s="0.2",
    )
    yield stack
    stack.stop()


async def test_redis_unreachable_gets_503_at_once(api_without_redis: str) -> None:
    async with httpx.AsyncClient(base_url=api_without_redis, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json=SEED)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "redis_unavailable"
    assert response.elapsed.total_seconds() < 3


async def test_no_live_worker_gets_503_no_workers(
    api_without_workers: tuple[Proc, str],
) -> None:
    _, url = api_without_workers
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json=SEED)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_workers"


def running_stream(r: redis.Redis) -> str:
    """The stream id of the one job in the queue, once a worker has claimed it ('' till then)."""
    jobs = r.zrange(queue_name("synthetic"), 0, -1)
    if len(jobs) != 1:
        return ""
    stream_id = str(jobs[0].decode().rpartition(".")[0])
    return stream_id if r.hget(f"sluice:meta:{stream_id}", "worker") else ""


async def test_job_nobody_starts_in_time_errors_and_is_withdrawn(
    one_slow_slot: Stack, redis_server: RedisServer
) -> None:
    with redis_server.client(3) as r:
        async with httpx.AsyncClient(base_url=one_slow_slot.base_url, timeout=30) as client:
            busy = asyncio.create_task(
                stream(client, {"prompt": "occupy the worker", "stream": True})
            )
            await eventually(lambda: running_stream(r), "the worker to take the first job")
            queued = await stream(client, {"prompt": "wait in line", "stream": True})
            stream_id = queued.headers["x-sluice-stream-id"]
            # Checked while the one slot is still busy: once it is free, the worker would take
            # (and so remove) a job that was not withdrawn.
            worker_was_busy = not busy.done()
            job_record = r.exists(f"arq:job:{stream_id}.1")
            in_queue = r.zscore(queue_name("synthetic"), f"{stream_id}.1")
            resumed = await stream(client, path=f"/v1/streams/{stream_id}")
            first = await busy

    assert queued.events[-1].data == "[DONE]"
    assert queued.errors[0]["code"] == "queue_timeout"
    assert worker_was_busy
    assert not job_record
    assert in_queue is None
    assert resumed.errors[0]["code"] == "queue_timeout"  # a later reader ends the same way
    assert resumed.events[-1].data == "[DONE]"
    assert first.events[-1].data == "[DONE]"
    assert not first.errors


async def test_resuming_an_expired_stream_gets_404(
    one_slow_slot: Stack, redis_server: RedisServer
) -> None:
    async with httpx.AsyncClient(base_url=one_slow_slot.base_url, timeout=30) as client:
        done = await stream(client, {"prompt": "short", "stream": True, "max_tokens": 2})
        stream_id = done.headers["x-sluice-stream-id"]
        with redis_server.client(3) as r:  # SLUICE_STREAM_TTL_S is 2 here
            await eventually(
                lambda: not r.exists(f"sluice:stream:{stream_id}", f"sluice:meta:{stream_id}"),
                "the stream to expire",
            )
        late = await client.get(f"/v1/streams/{stream_id}")

    assert late.status_code == 404
    assert late.json()["error"]["code"] == "stream_not_found"


@pytest.fixture(scope="module")
def api_without_access_log(redis_server: RedisServer) -> Iterator[tuple[Proc, str]]:
    env = sluice_env(redis_server.url(4), free_port(), backend="synthetic", access_log="false")
    api, url = start_api("no-access-log", env)
    yield api, url
    api.stop()


async def test_access_log_can_be_turned_off(
    api_without_workers: tuple[Proc, str], api_without_access_log: tuple[Proc, str]
) -> None:
    logged, logged_url = api_without_workers
    quiet, quiet_url = api_without_access_log
    async with httpx.AsyncClient(timeout=10) as client:
        for url in (logged_url, quiet_url):
            await client.post(f"{url}/v1/chat/completions", json=SEED)

    await eventually(lambda: "POST /v1/chat/completions" in logged.log_text(), "an access log")
    assert "POST /v1/chat/completions" not in quiet.log_tail(200)
