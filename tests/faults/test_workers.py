"""Workers that die, are told to stop, or never start: no client is left hanging."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import redis

from shared.protocol import MODELS_KEY, queue_name
from tests.faults.conftest import StackFactory, worker_pid
from tests.procs import Stack, eventually
from tests.sse import stream

QUEUE = queue_name("synthetic")


def running_worker(r: redis.Redis, stream_id: str) -> str:
    worker = r.hget(f"sluice:meta:{stream_id}", "worker")
    return worker.decode() if worker else ""


def stream_id_of_only_job(r: redis.Redis) -> str:
    [job] = r.zrange(QUEUE, 0, -1)
    return str(job.decode().rpartition(".")[0])


def entries(r: redis.Redis, stream_id: str) -> int:
    return int(r.xlen(f"sluice:stream:{stream_id}"))


def started_by(r: redis.Redis, stream_id: str) -> str:
    """The worker named by the stream's `Started` entry."""
    [(_, fields)] = r.xrange(f"sluice:stream:{stream_id}", count=1)
    return str(json.loads(fields[b"s"])["w"])


def db_client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)


async def test_worker_killed_mid_stream_ends_it_with_worker_lost_within_seconds(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="10")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        reading = asyncio.create_task(stream(client, {"prompt": "die midway", "stream": True}))
        with db_client(stack) as r:
            await eventually(lambda: r.zcard(QUEUE) == 1, "the job")
            stream_id = stream_id_of_only_job(r)
            await eventually(lambda: entries(r, stream_id) > 10, "~10 tokens out")
            worker = running_worker(r, stream_id)
            killed_at = time.monotonic()
            os.kill(worker_pid(worker), signal.SIGKILL)
            result = await reading
            took = time.monotonic() - killed_at
            leftovers = [k for k in r.scan_iter("*") if r.ttl(k) == -1]

    assert result.text.startswith("You asked: die midway")
    assert result.errors[-1]["code"] == "worker_lost"
    assert result.events[-1].data == "[DONE]"
    assert took < 6
    # Only keys meant to last: the queue, and the table of models ever served.
    assert set(leftovers) <= {QUEUE.encode(), MODELS_KEY.encode()}


async def test_worker_killed_before_its_first_token_is_replaced_unnoticed(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=2, synthetic_tokens_per_s="1", worker_max_jobs="1")
    body = {"prompt": "survive", "stream": True, "max_tokens": 3}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        reading = asyncio.create_task(stream(client, body))
        with db_client(stack) as r:
            await eventually(lambda: r.zcard(QUEUE) == 1, "the job")
            stream_id = stream_id_of_only_job(r)
            await eventually(lambda: running_worker(r, stream_id), "a worker to claim it")
            first = running_worker(r, stream_id)
            os.kill(worker_pid(first), signal.SIGKILL)  # its first token is ~1 s away
            result = await reading
            second = running_worker(r, stream_id)

    assert not result.errors
    assert result.text == "You asked: survive"
    assert second not in ("", first)


async def test_job_that_crashes_its_worker_twice_gets_an_error_not_a_third_try(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=3, worker_max_jobs="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await stream(client, {"prompt": "poison [[crash after 0]]", "stream": True})

    assert result.errors[-1]["code"] == "worker_lost"
    assert "2 times" in result.errors[-1]["message"]
    assert sum(w.alive() for w in stack.workers) == 1


async def test_sigterm_drains_the_running_stream_takes_no_new_job_and_exits_0(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="20", worker_max_jobs="1")
    draining = stack.workers[0]
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        running = asyncio.create_task(stream(client, {"prompt": "finish me", "stream": True}))
        with db_client(stack) as r:
            await eventually(lambda: r.zcard(QUEUE) == 1, "the job")
            running_id = stream_id_of_only_job(r)
            await eventually(lambda: entries(r, running_id) >= 2, "its first token")
            draining.signal(signal.SIGTERM)
            fresh = stack.add_worker()
            later = await stream(client, {"prompt": "after the deploy", "stream": True})
            finished = await running
            later_worker = started_by(r, later.headers["x-sluice-stream-id"])

    assert not finished.errors
    assert finished.text.endswith("will never come.")
    assert not later.errors
    assert worker_pid(later_worker) == fresh.pid
    assert draining.stop(timeout=15) == 0
    assert fresh.alive()


def test_worker_that_cannot_load_its_model_exits_nonzero_saying_why(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = make_stack(workers=1)
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a model")
    broken = stack.add_worker(SLUICE_BACKEND="llama", SLUICE_MODEL_PATH=str(bogus))

    code = broken.popen.wait(60) if broken.popen else None

    assert code not in (0, None)
    assert "could not load its backend" in broken.log_tail()
