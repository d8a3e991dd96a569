"""A stream ends even when Redis refuses the writes that would end it: the worker retries its
end, and the supervisor ends or retries a stream whose live worker let go of it. Redis refuses
for real: out of memory (`maxmemory`), or an ACL that denies the worker's user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from shared.protocol import MAX_ATTEMPTS, Token, from_fields, job_id, meta_key, stream_key
from tests.faults.conftest import StackFactory
from tests.procs import RedisServer, Stack, eventually
from tests.sse import stream

WORKER_USER, WORKER_PASSWORD = "worker", "worker-secret"
SLOW_QUEUE_AND_JOBS = {"queue_timeout_s": "60", "job_timeout_s": "60"}
"""Far beyond what any test here waits: an end must come from the fix, not from a timeout."""


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: its memory and users are changed under the stack."""
    server = RedisServer().start()
    yield server
    server.stop()


def with_worker_user(stack: Stack, server: RedisServer, **settings: str) -> None:
    """Adds a worker that connects as `WORKER_USER`, whose rights the test then takes away."""
    acl(server, "on", f">{WORKER_PASSWORD}", "~*", "&*", "+@all")
    db = stack.redis_url.rsplit("/", 1)[1]
    url = f"redis://{WORKER_USER}:{WORKER_PASSWORD}@127.0.0.1:{server.port}/{db}"
    stack.add_worker(
        SLUICE_REDIS_URL=url, **{f"SLUICE_{k.upper()}": v for k, v in settings.items()}
    )
    stack.wait_ready(1)


def acl(server: RedisServer, *rules: str) -> None:
    """`ACL SETUSER` for the worker's user: Redis checks it in scripts too."""
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", WORKER_USER, *rules)


async def test_an_end_redis_refuses_at_first_is_written_once_it_accepts(
    make_stack: StackFactory, private_redis: RedisServer
) -> None:
    """The terminal entry of a stream failing mid-answer meets a Redis out of memory for a
    second: the worker retries it, and the client gets the error event and [DONE] then, not at
    the job timeout."""
    stack = make_stack(
        workers=1,
        redis=private_redis,
        synthetic_tokens_per_s="10",
        heartbeat_s="1",
        **SLOW_QUEUE_AND_JOBS,
    )
    body = {"prompt": "fail softly [[fail after 5]]", "stream": True}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        reading = asyncio.create_task(stream(client, body))
        with private_redis.client(int(stack.redis_url.rsplit("/", 1)[1])) as r:
            stream_id = await _first_stream(r)
            # The fifth token is in; the failure (and the end) comes one token-time later.
            await eventually(lambda: _tokens(r, stream_id) >= 5, "five tokens")
            r.config_set("maxmemory", 1)
            try:
                await asyncio.sleep(1.0)
                assert not reading.done()
            finally:
                r.config_set("maxmemory", 0)
            result = await asyncio.wait_for(reading, 10)

    assert result.errors[-1]["code"] == "generation_failed"
    assert "synthetic failure" in result.errors[-1]["message"]
    assert result.events[-1].data == "[DONE]"


async def test_a_stream_whose_live_worker_let_go_of_it_is_ended_within_heartbeats(
    make_stack: StackFactory, private_redis: RedisServer
) -> None:
    """Redis refuses every append of the worker's user (XADD denied) for longer than the worker
    retries: the worker gives the job up while it keeps beating. The supervisor sees it no
    longer runs the job, tries it once more (no token was written), then ends it."""
    stack = make_stack(workers=0, redis=private_redis, **SLOW_QUEUE_AND_JOBS)
    with_worker_user(stack, private_redis, redis_retry_s="0.5", **SLOW_QUEUE_AND_JOBS)
    acl(private_redis, "-xadd")
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await asyncio.wait_for(stream(client, {"prompt": "hi", "stream": True}), 20)

    assert result.errors[-1]["code"] == "worker_lost"
    assert "2 times" in result.errors[-1]["message"]
    assert result.events[-1].data == "[DONE]"
    assert time.monotonic() - started < 15
    with private_redis.client(int(stack.redis_url.rsplit("/", 1)[1])) as r:
        stream_id = result.headers["x-sluice-stream-id"]
        assert r.hget(meta_key(stream_id), "job") == job_id(stream_id, MAX_ATTEMPTS).encode()


async def test_a_job_whose_claim_redis_refuses_is_retried_then_ended_not_left_queued(
    make_stack: StackFactory, private_redis: RedisServer
) -> None:
    """The worker's user may read but not write stream metadata, so its claim of every job
    fails: arq lets go of the job, and the supervisor retries it, then ends it, instead of
    leaving it for the queue timeout."""
    stack = make_stack(workers=0, redis=private_redis, **SLOW_QUEUE_AND_JOBS)
    with_worker_user(stack, private_redis, redis_retry_s="0.5", **SLOW_QUEUE_AND_JOBS)
    acl(private_redis, "resetkeys", "~arq:*", "~sluice:[^m]*", "~sluice:models", "%R~sluice:meta:*")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await asyncio.wait_for(stream(client, {"prompt": "hi", "stream": True}), 20)

    assert result.errors[-1]["code"] == "worker_lost"
    assert result.events[-1].data == "[DONE]"


async def _first_stream(r: redis.Redis) -> str:
    key: bytes = await eventually(lambda: next(r.scan_iter(stream_key("*")), None), "a stream")
    return key.decode().removeprefix(stream_key(""))


def _tokens(r: redis.Redis, stream_id: str) -> int:
    found = [from_fields(fields) for _, fields in r.xrange(stream_key(stream_id))]
    return sum(isinstance(entry, Token) for entry in found)


async def test_a_job_taken_from_the_queue_whose_stream_is_never_claimed_goes_to_another_worker(
    make_stack: StackFactory, private_redis: RedisServer
) -> None:
    """A worker takes the job from the queue (arq's in-progress key), then cannot claim its
    stream, and keeps trying (Redis refuses it writes to stream metadata, and it retries for a
    minute). The supervisor does not wait for the in-progress key to lapse (the job timeout):
    past a worker TTL it tries the job again, and another worker serves it."""
    stack = make_stack(workers=0, redis=private_redis, **SLOW_QUEUE_AND_JOBS)
    with_worker_user(
        stack,
        private_redis,
        redis_retry_s="60",
        worker_max_jobs="1",  # busy with the first attempt: the second is not its to take
        drain_s="0",
        **SLOW_QUEUE_AND_JOBS,
    )
    acl(private_redis, "resetkeys", "~arq:*", "~sluice:[^m]*", "~sluice:models", "%R~sluice:meta:*")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        reading = asyncio.create_task(stream(client, {"prompt": "hi", "stream": True}))
        with private_redis.client(int(stack.redis_url.rsplit("/", 1)[1])) as r:
            await eventually(lambda: next(r.scan_iter("arq:in-progress:*"), None), "a claim")
        stack.add_worker()  # one whose claims Redis takes
        result = await asyncio.wait_for(reading, 20)

    assert not result.errors
    assert result.text.startswith("You asked: hi")
