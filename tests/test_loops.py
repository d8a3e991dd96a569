"""Background loops never die silently: a failing loop is restarted with backoff, logged once
per streak with its cause, and shown by /health until it runs again."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis

from shared.errors import StreamReaderFailed
from shared.loops import LoopGroup
from shared.protocol import DUE_KEY
from tests.hubs import running_hub
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
    just_restarted = group.states()
    await eventually(lambda: group.states() == {"flaky": "running"}, "settled")
    await group.stop()

    assert loop.restarts == 3
    assert loop.last_error == "RuntimeError: failure 3"
    assert just_restarted == {"flaky": "restarting"}
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


async def test_a_loop_failing_shortly_after_each_start_never_reads_as_running() -> None:
    """Between two failed attempts the loop runs for a moment; health must not flap to running."""

    async def fails_on_its_first_tick() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("tick failed")

    group = LoopGroup(logging.getLogger("test.loops"))
    group.start("ticking", fails_on_its_first_tick)
    await asyncio.sleep(0.06)
    samples: list[str] = []
    for _ in range(60):
        samples.append(group.states()["ticking"])
        await asyncio.sleep(0.02)
    await group.stop()

    assert set(samples) == {"restarting"}


@pytest.fixture
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    stack = start_stack("loops", redis_server.url(12), 1, backend="synthetic", supervise_s="0.1")
    yield stack
    stack.stop()


def health(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.base_url}/health", timeout=2)


def ready(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.base_url}/ready", timeout=2)


async def test_readiness_names_a_loop_that_fails_and_recovers_when_it_runs_again(
    stack: Stack,
) -> None:
    """A real fault: the supervisor's index of due streams replaced by a string, so every tick
    fails."""
    with redis.Redis.from_url(stack.redis_url) as r:
        r.set(DUE_KEY, "not a sorted set")
        failing = await eventually(lambda: ready(stack).status_code == 503, "a 503")
        body = ready(stack).json()
        alive = health(stack)
        r.delete(DUE_KEY)
        await eventually(lambda: ready(stack).status_code == 200, "recovery")

    assert failing
    assert body["loops"]["supervisor"] == "restarting"
    assert body["reasons"] == ["loop:supervisor"]
    assert body["redis"] is True
    assert alive.status_code == 200  # liveness: the process serves, do not restart it
    assert ready(stack).json()["loops"]["supervisor"] == "running"
    assert "loop supervisor failed" in stack.api.log_tail(400)


async def test_a_stream_reader_that_fails_ends_its_waiters_and_reads_again_once_restarted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the shared XREAD loop (injected: its read raises once) must neither leave the
    relays waiting for ever nor stop the process reading: they end, and new reads succeed."""
    client = Redis.from_url(redis_server.url())
    key = f"loops-test-{uuid.uuid4().hex}"
    async with running_hub(client) as (hub, loops):
        read = hub._reader.read
        failures = iter([RuntimeError("injected")])

        async def read_once_broken(streams: dict[str, str], **options: Any) -> object:
            if (failure := next(failures, None)) is not None:
                raise failure
            return await read(streams, **options)

        monkeypatch.setattr(hub._reader, "read", read_once_broken)
        with pytest.raises(StreamReaderFailed):
            await asyncio.wait_for(hub.read(key, "0-0"), 5)
        restarts = next(loop.restarts for loop in loops._loops if loop.name == "stream-reader")
        await client.xadd(key, {"t": "after the restart"})
        entries = await asyncio.wait_for(hub.read(key, "0-0"), 5)
    await client.delete(key)
    await client.aclose()

    assert restarts == 1
    assert entries[0][1] == [b"t", b"after the restart"]
