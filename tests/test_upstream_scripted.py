"""The `openai` backend against a scripted engine (tests/upstreams.py `ScriptedEngine`), for what
a real engine will not do on cue: hang, refuse a parameter as a strict hosted API does, and show
the exact body sluice sent it.

Each test's stack runs on database 45, emptied first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from shared.protocol import meta_key, serving_key
from tests.procs import LOGS, RedisServer, Stack, answered, eventually, free_port, start_stack
from tests.sse import SSEResult, stream
from tests.upstreams import ScriptedEngine

NAME = "upstream-scripted"
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
    """API + one `openai` worker in front of `url`, serving it as `scripted`; its processes' logs
    start empty, for the test to read."""
    stacks: list[Stack] = []

    def make(url: str, **settings: str) -> Stack:
        assert not stacks, "one stack per test: they share database 45"
        for log in LOGS.glob(f"{NAME}*.log"):
            log.unlink()
        stack = start_stack(
            NAME,
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


@pytest.mark.parametrize(
    ("mode", "text"), [("headers", ""), ("chunks", "word0 word1 word2 ")], ids=["headers", "chunks"]
)
async def test_an_engine_silent_after_its_headers_or_some_chunks_ends_the_stream_upstream_timeout(
    engine: ScriptedEngine, make_stack: Make, mode: str, text: str
) -> None:
    engine.mode = mode
    stack = make_stack(engine.v1, upstream_timeout_s="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        result, took = await timed_stream(client, chat())

    assert result.status == 200
    assert result.text == text
    assert result.errors[-1]["code"] == "upstream_timeout"
    assert "127.0.0.1" not in result.errors[-1]["message"]
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


async def test_a_job_whose_engine_hangs_before_its_first_token_goes_to_another_worker(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    """The first worker takes the job (the second is frozen meanwhile) and its engine hangs:
    the job, with no token yet, is given back and the second worker's engine answers it."""
    answering = ScriptedEngine().start()
    try:
        stack = make_stack(engine.v1, upstream_timeout_s="1")
        second = stack.add_worker(SLUICE_UPSTREAM_URL=answering.v1)
        with redis.Redis.from_url(stack.redis_url) as r:
            await eventually(lambda: r.zcard(serving_key(MODEL)) == 2, "both workers serving")
            # `/models` too: an engine whose probe answers may take the job's retry back.
            engine.hung = True
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


async def test_only_the_sampling_the_client_gave_reaches_the_engine(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    stack = make_stack(engine.v1)
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        for body in (chat(), chat(temperature=0.3, presence_penalty=0.5)):
            assert not (await timed_stream(client, body))[0].errors

    bare, given = engine.bodies
    assert not {name: bare[name] for name in SAMPLING if name in bare}
    assert {name: given[name] for name in SAMPLING if name in given} == {
        "temperature": 0.3,
        "presence_penalty": 0.5,
    }


async def test_the_seed_formats_min_tokens_is_never_above_max_tokens(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    stack = make_stack(engine.v1)
    seed = {"prompt": "Explain streaming APIs", "stream": True}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        for body in (seed, {**seed, "max_tokens": 100}):
            assert not (await timed_stream(client, body))[0].errors

    assert [(b["min_tokens"], b["max_tokens"]) for b in engine.bodies] == [(450, 768), (100, 100)]


async def test_an_engine_that_refuses_min_tokens_gets_the_seed_format_without_it(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    """As OpenAI's own API does: 400 for an argument it does not know."""
    engine.refuses = {"min_tokens"}
    stack = make_stack(engine.v1)
    seed = {"prompt": "Explain streaming APIs", "stream": True}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        first, _ = await timed_stream(client, seed)
        sent_for_first = len(engine.bodies)
        second, _ = await timed_stream(client, seed)
        # The client's own min_tokens is the client's: the engine's refusal is its answer.
        own = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": USER, "min_tokens": 5}
        )

    assert not first.errors
    assert not second.errors
    assert "word4" in first.text
    assert sent_for_first == 2
    assert ["min_tokens" in b for b in engine.bodies] == [True, False, False, True]
    assert own.status_code == 400
    assert own.json()["error"]["message"] == "Unrecognized request argument supplied: min_tokens"
    assert stack.workers[0].log_tail(100).count("refuses min_tokens") == 1


# --- the way to the engine ---


async def test_the_engine_is_reached_through_the_proxy_the_environment_names(
    engine: ScriptedEngine, make_stack: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`HTTP_PROXY` and `NO_PROXY`, as httpx and the openai SDK honour them: the engine's host
    resolves nowhere, and only the proxy (the scripted engine, which also answers a proxy's
    absolute-form requests) can reach it."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{engine.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the API, for the test's client
    stack = make_stack("http://engine.invalid/v1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        result, _ = await timed_stream(client, chat())

    assert not result.errors
    assert result.text == "word0 word1 word2 word3 word4 "
    assert len(engine.bodies) == 1


# --- what the engine's stream may hold ---


async def test_an_engine_chunk_over_the_http_clients_default_line_limit_arrives_whole(
    engine: ScriptedEngine, make_stack: Make
) -> None:
    """An engine may send a long text (a pasted document echoed, a tool call's arguments) as one
    chunk, one line of its stream: aiohttp refuses a line over twice its read buffer (64 KiB by
    default in 3.10, 256 KiB in 3.14) unless the session sets a larger one."""
    text = "word " * 300_000
    delta = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    end = {"index": 0, "delta": {}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 3, "completion_tokens": 300_000, "total_tokens": 300_003}
    engine.mode = "script"
    engine.script = [{"choices": [delta]}, {"choices": [end]}, {"choices": [], "usage": usage}]
    stack = make_stack(engine.v1)
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        result, _ = await timed_stream(client, chat())

    assert not result.errors
    assert result.text == text
