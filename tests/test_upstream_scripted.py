"""The `openai` backend against a scripted engine (tests/upstreams.py `ScriptedEngine`), for what
a real engine will not do on cue: hang, refuse a parameter as a strict hosted API does, and show
the exact body sluice sent it.

Each test's stack runs on database 45, emptied first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from shared.protocol import meta_key, serving_key
from tests.procs import RedisServer, Stack, eventually, free_port, start_stack
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


async def test_an_engine_silent_after_its_headers_ends_the_stream_upstream_timeout(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    engine.mode = "headers"
    stack = make_stack(engine.v1, upstream_timeout_s="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        result, took = await timed_stream(client, chat())

    assert result.status == 200
    assert result.errors[-1]["code"] == "upstream_timeout"
    assert "127.0.0.1" not in result.errors[-1]["message"]
    assert result.events[-1].data == "[DONE]"
    assert took < 5


async def test_an_engine_silent_after_three_chunks_ends_the_stream_upstream_timeout(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    engine.mode = "chunks"
    stack = make_stack(engine.v1, upstream_timeout_s="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        result, took = await timed_stream(client, chat())

    assert result.text == "word0 word1 word2 "
    assert result.errors[-1]["code"] == "upstream_timeout"
    assert result.events[-1].data == "[DONE]"
    assert took < 5


async def test_a_hung_engine_gets_no_job_until_it_answers_a_probe(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    stack = make_stack(engine.v1, upstream_timeout_s="1", retry_after_s="7")
    engine.hung = True  # accepts connections, answers nothing, `/models` included
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        timed_out, _ = await timed_stream(client, chat())
        with redis.Redis.from_url(stack.redis_url) as r:
            await eventually(lambda: r.zcard(serving_key(MODEL)) == 0, "the worker to leave")
        refused = [
            await client.post("/v1/chat/completions", json={**chat(), "stream": False})
            for _ in range(3)
        ]
        await asyncio.sleep(2)  # probes, unanswered
        asked_while_hung = len(engine.bodies)

        engine.hung = False
        served = await answered(lambda: client.post("/v1/chat/completions", json=chat()))

    assert timed_out.errors[-1]["code"] == "upstream_timeout"
    assert [r.status_code for r in refused] == [503] * 3
    assert {r.json()["error"]["code"] for r in refused} == {"upstream_unavailable"}
    assert {r.headers["retry-after"] for r in refused} == {"7"}
    assert asked_while_hung == 1  # the first request's, and none since
    assert "word4" in served.text


async def answered(
    request: Callable[[], Awaitable[httpx.Response]], within_s: float = 10
) -> httpx.Response:
    """`request` again until it answers 200, for up to `within_s`."""
    deadline = time.monotonic() + within_s
    while (response := await request()).status_code != 200:
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.2)
    return response


async def test_a_job_whose_engine_hangs_before_its_first_token_goes_to_another_worker(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    """The first worker takes the job (the second is frozen meanwhile) and its engine hangs:
    the job, with no token yet, is given back and the second worker's engine answers it."""
    engine.mode = "headers"
    answering = ScriptedEngine().start()
    try:
        stack = make_stack(engine.v1, upstream_timeout_s="1")
        second = stack.add_worker(SLUICE_UPSTREAM_URL=answering.v1)
        with redis.Redis.from_url(stack.redis_url) as r:
            await eventually(lambda: r.zcard(serving_key(MODEL)) == 2, "both workers serving")
            second.signal(signal.SIGSTOP)
            try:
                async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
                    request = asyncio.ensure_future(timed_stream(client, chat()))
                    await eventually(lambda: engine.bodies, "the first worker to ask its engine")
                    second.signal(signal.SIGCONT)
                    result, took = await request
            finally:
                second.signal(signal.SIGCONT)
            served_by = r.hget(meta_key(result.headers["x-sluice-stream-id"]), "worker")
    finally:
        answering.stop()

    assert not result.errors, result.errors
    assert result.text == "word0 word1 word2 word3 word4 "
    assert result.events[-1].data == "[DONE]"
    assert f"-{second.pid}-" in (served_by or b"").decode()
    assert took < 8
    assert "given back" in stack.workers[0].log_tail(100)


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
