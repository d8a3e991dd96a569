"""The `openai` backend against a scripted engine (tests/upstreams.py `ScriptedEngine`), for what
a real engine will not do on cue: hang, refuse a parameter as a strict hosted API does, and show
the exact body sluice sent it.

Each test's stack runs on database 45, emptied first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.procs import RedisServer, Stack, free_port, start_stack
from tests.sse import SSEResult, stream
from tests.upstreams import ScriptedEngine

MODEL = ScriptedEngine.MODEL
USER = [{"role": "user", "content": "Name three rivers."}]
SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty")

Make = Callable[..., Stack]


@pytest.fixture
def engine() -> Iterator[ScriptedEngine]:
    scripted = ScriptedEngine().start()
    yield scripted
    scripted.stop()


@pytest.fixture
def make_stack(redis_server: RedisServer) -> Iterator[Make]:
    """API + one `openai` worker in front of `url`, serving it as `scripted`."""
    stacks: list[Stack] = []

    def make(url: str, **settings: str) -> Stack:
        assert not stacks, "one stack per test: they share database 45"
        stack = start_stack(
            "upstream-scripted",
            redis_server.fresh_url(45),
            1,
            backend="openai",
            upstream_url=url,
            upstream_model=MODEL,
            **settings,
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


async def timed_stream(
    client: httpx.AsyncClient, body: dict[str, Any], within_s: float = 15
) -> tuple[SSEResult, float]:
    """The stream, and the seconds it took; a stream still open after `within_s` fails."""
    started = time.monotonic()
    result = await asyncio.wait_for(stream(client, body), within_s)
    return result, time.monotonic() - started


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "stream": True, **fields}


# --- an engine that hangs (SLUICE_UPSTREAM_TIMEOUT_S) ---


async def answered(
    request: Callable[[], Awaitable[httpx.Response]], within_s: float = 10
) -> httpx.Response:
    """`request` again until it answers 200, for up to `within_s`."""
    deadline = time.monotonic() + within_s
    while (response := await request()).status_code != 200:
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.2)
    return response


# --- engines all down ---


async def test_a_model_whose_engines_are_all_down_is_refused_at_once_with_retry_after(
    make_stack: Make,
) -> None:
    stack = make_stack(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        started = time.monotonic()
        named = await client.post("/v1/chat/completions", json=chat())
        seed = await client.post("/v1/chat/completions", json={"prompt": "hi", "stream": True})
        took = time.monotonic() - started

    for refused in (named, seed):
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "upstream_unavailable"
        assert refused.headers["retry-after"] == "5"
    assert took < 1


# --- what is sent ---
