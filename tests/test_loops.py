"""Background loops never die silently: a failing loop is restarted with backoff, logged once
per streak with its cause, and shown by /health until it runs again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import pytest
import redis

from shared.loops import LoopGroup
from shared.protocol import ACTIVE_KEY
from tests.procs import RedisServer, Stack, eventually, start_stack


async def test_a_failing_loop_is_restarted_and_its_failures_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0
    healthy = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"failure {runs}")
        healthy.set()
        await asyncio.Event().wait()

    group = LoopGroup(logging.getLogger("test.loops"))
    loop = group.start("flaky", flaky)
    with caplog.at_level(logging.ERROR, logger="test.loops"):
        await asyncio.wait_for(healthy.wait(), 5)
    states = group.states()
    await group.stop()

    assert loop.restarts == 3
    assert loop.last_error == "RuntimeError: failure 3"
    assert states == {"flaky": "running"}
    assert len(caplog.records) == 1
    assert "failure 1" in caplog.text
    assert group.states() == {}


async def test_a_loop_that_keeps_failing_shows_as_restarting() -> None:
    async def broken() -> None:
        raise RuntimeError("always")

    group = LoopGroup(logging.getLogger("test.loops"))
    group.start("broken", broken)
    await eventually(lambda: group.states() == {"broken": "restarting"}, "a restarting loop")

    assert not group.healthy
    await group.stop()


@pytest.fixture
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    stack = start_stack("loops", redis_server.url(12), 1, backend="synthetic", supervise_s="0.1")
    yield stack
    stack.stop()


def health(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.base_url}/health", timeout=2)


async def test_health_names_a_loop_that_fails_and_recovers_when_it_runs_again(
    stack: Stack,
) -> None:
    """A real fault: the supervisor's worklist replaced by a string, so every tick fails."""
    with redis.Redis.from_url(stack.redis_url) as r:
        r.set(ACTIVE_KEY, "not a sorted set")
        failing = await eventually(lambda: health(stack).status_code == 503, "a 503")
        body = health(stack).json()
        r.delete(ACTIVE_KEY)
        await eventually(lambda: health(stack).status_code == 200, "recovery")

    assert failing
    assert body["loops"]["supervisor"] == "restarting"
    assert body["redis"] is True
    assert health(stack).json()["loops"]["supervisor"] == "running"
    assert "loop supervisor failed" in stack.api.log_tail(400)
