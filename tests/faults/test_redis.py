"""Redis goes away mid-stream and comes back: clients get clean ends, then service resumes."""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from tests.faults.conftest import StackFactory
from tests.procs import RedisServer, eventually, free_port, sluice, sluice_env, start_api
from tests.sse import stream


async def test_redis_restart_ends_open_streams_then_everything_recovers_by_itself(
    make_stack: StackFactory,
) -> None:
    own = RedisServer().start()
    restarted = RedisServer(own.port)
    try:
        stack = make_stack(workers=1, redis=own, synthetic_tokens_per_s="20")
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
            open_stream = asyncio.create_task(stream(client, {"prompt": "cut", "stream": True}))
            with redis.Redis.from_url(stack.redis_url) as r:
                await eventually(lambda: tokens_written(r), "the stream to be under way")
            own.stop()
            stopped_at = time.monotonic()
            cut = await open_stream
            ended_after = time.monotonic() - stopped_at

            refused = await client.post(
                "/v1/chat/completions", json={"prompt": "x", "stream": True}
            )

            restarted.start()
            await eventually(lambda: healthy(stack.base_url), "api and worker to reconnect")
            after = await stream(client, {"prompt": "back again", "stream": True})
    finally:
        own.stop()
        restarted.stop()

    assert cut.events[-1].data == "[DONE]"
    assert cut.errors[-1]["code"] == "redis_unavailable"
    assert ended_after < 3
    assert refused.status_code == 503
    assert refused.elapsed.total_seconds() < 3
    assert not after.errors
    assert after.text.endswith("will never come.")
    assert all(p.alive() for p in (stack.api, *stack.workers))


def tokens_written(r: redis.Redis) -> bool:
    """Whether the stack's one stream has its `Started` entry and a token after it."""
    return any(r.xlen(key) >= 2 for key in r.scan_iter("sluice:stream:*"))


def healthy(base_url: str) -> bool:
    try:
        return bool(httpx.get(f"{base_url}/ready", timeout=1).json().get("workers", 0) >= 1)
    except (httpx.HTTPError, ValueError):
        return False


async def test_a_worker_started_before_redis_waits_for_it_then_serves() -> None:
    later = RedisServer()  # its port is chosen; nothing listens on it yet
    env = sluice_env(later.url(), free_port(), backend="synthetic")
    worker = sluice("worker", "redis-later-w0", env)
    api = None
    try:
        await asyncio.sleep(2)  # the worker has tried, and waits
        assert worker.alive()
        later.start()
        api, base_url = start_api("redis-later", env)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            served = await stream(client, {"prompt": "late", "stream": True, "max_tokens": 3})
        assert served.events[-1].data == "[DONE]"
        assert not served.errors
    finally:
        for proc in (api, worker, later):
            if proc is not None:
                proc.stop()
