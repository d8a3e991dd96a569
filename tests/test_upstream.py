"""The `openai` backend on real engines: llama.cpp's own `llama-server`, and another sluice.

Whatever sluice adds (the queue, resume, cancel, the error events), a stream through it carries
the engine's own text and usage; the engine's refusals come back as its own 4xx; and a stream
that ends early, however it ends, frees the engine's slot at once (`GET /slots`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.gateway import STREAM_ID_HEADER
from bench import common
from bench.upstream import engine_first_token_ms, proxy_server
from shared.protocol import ACTIVE_KEY, Failed, from_fields, stream_key
from tests.procs import RedisServer, Stack, answered, eventually, start_stack
from tests.sse import SSEResult, parse_sse, stream
from tests.upstreams import LlamaServer

pytestmark = pytest.mark.model

USER = [{"role": "user", "content": "Name three rivers."}]
GREEDY = {"temperature": 0, "top_p": 1, "max_tokens": 24}
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A prompt the model goes on counting from, greedily, for as long as it is let."""


def long_prompt(tokens: int) -> str:
    """About `tokens` tokens, starting with a word of its own so that no cached prefix helps."""
    return f"{time.monotonic_ns()} " + "the quick brown fox jumps over the lazy dog " * (
        tokens // 9
    )


@pytest.fixture(scope="module")
def upstream(redis_server: RedisServer, llama_server: LlamaServer) -> Iterator[Stack]:
    """API + one `openai` worker in front of the session's llama-server."""
    stack = start_stack(
        "upstream",
        redis_server.url(40),
        1,
        backend="openai",
        upstream_url=llama_server.v1,
        max_prompt_chars="200000",  # prompts past the engine's context, for its own 400
        resume_grace_s="1",
        job_timeout_s="8",
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def model(llama_server: LlamaServer) -> str:
    """What sluice serves by default: the first model the engine lists."""
    return llama_server.model_id()


@pytest.fixture
async def client(upstream: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=60) as c:
        yield c


@pytest.fixture
async def engine(llama_server: LlamaServer) -> AsyncIterator[httpx.AsyncClient]:
    """The engine itself, for what sluice should answer like."""
    async with httpx.AsyncClient(base_url=llama_server.v1, timeout=60) as c:
        yield c


@pytest.fixture
async def sdks(upstream: Stack, llama_server: LlamaServer) -> AsyncIterator[dict[str, Any]]:
    """The official SDK, pointed at sluice and at the engine itself."""
    async with (
        openai.AsyncOpenAI(base_url=f"{upstream.base_url}/v1", api_key="unused") as sluice,
        openai.AsyncOpenAI(base_url=llama_server.v1, api_key="unused") as engine,
    ):
        yield {"sluice": sluice, "engine": engine}


Fresh = Callable[..., tuple[LlamaServer, Stack]]
_fresh_databases = itertools.count(41)


@pytest.fixture
def fresh(redis_server: RedisServer, llama_server_binary: Path) -> Iterator[Fresh]:
    """An engine of its own (to kill) and a stack in front of it, on databases 41 to 44."""
    engines: list[LlamaServer] = []
    stacks: list[Stack] = []

    def make(*, down: bool = False, **settings: str) -> tuple[LlamaServer, Stack]:
        """`down`: the engine is gone before its worker starts."""
        engine = LlamaServer(llama_server_binary, slots=1).start()
        engines.append(engine)
        if down:
            engine.kill()
        db = next(_fresh_databases)
        stack = start_stack(
            f"upstream-db{db}",
            redis_server.fresh_url(db),
            1,
            backend="openai",
            upstream_url=engine.v1,
            upstream_model="smol",  # no need to ask an engine that may be down
            **settings,
        )
        stacks.append(stack)
        return engine, stack

    yield make
    for stack in stacks:
        stack.stop()
    for engine in engines:
        engine.stop()


async def wait_idle(engine: LlamaServer) -> float:
    """Seconds until no slot of the engine is processing (at most 10)."""
    start = time.monotonic()
    await eventually(lambda: engine.busy_slots() == 0, "the engine's slots to be idle")
    return time.monotonic() - start


class OpenStream:
    """A streaming request held open, read event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.stream_id = response.headers[STREAM_ID_HEADER]
        self._lines = response.aiter_lines()
        self.lines: list[str] = []
        self.content = 0

    async def read_content(self, events: int) -> None:
        """Until `events` more content events have arrived."""
        goal = self.content + events
        while self.content < goal:
            await self.read_event()

    async def read_event(self) -> dict[str, Any]:
        """Until the next data event (a chunk)."""
        while not (line := await anext(self._lines)).startswith("data: {"):
            self.lines.append(line)
        self.lines.append(line)
        chunk: dict[str, Any] = json.loads(line[6:])
        choice = (chunk.get("choices") or [{}])[0]
        self.content += bool(choice.get("delta", {}).get("content") or choice.get("text"))
        return chunk

    async def rest(self) -> SSEResult:
        async for line in self._lines:
            self.lines.append(line)
        events, comments = parse_sse(self.lines)
        return SSEResult(self.response.status_code, self.response.headers, events, comments)


def counting(model: str, max_tokens: int = 2000) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": COUNTING,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def no_network_detail(error: dict[str, Any]) -> None:
    assert "127.0.0.1" not in error["message"]
    assert "http" not in error["message"].lower()


# --- what passes through ---


async def test_a_chat_stream_is_the_engines_own_text_and_usage(
    sdks: dict[str, Any], model: str
) -> None:
    engine = await sdks["engine"].chat.completions.create(model=model, messages=USER, **GREEDY)

    chunks = [
        c
        async for c in await sdks["sluice"].chat.completions.create(
            model=model,
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    ]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine.choices[0].message.content
    assert text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [engine.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == engine.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == engine.usage.completion_tokens


async def test_the_worker_logs_the_engines_own_time_to_first_token(
    client: httpx.AsyncClient, upstream: Stack, model: str
) -> None:
    """What bench/upstream.py subtracts from a client's time to first token to find sluice's."""
    asked = time.perf_counter()
    result = await stream(client, {"model": model, "messages": USER, "stream": True, **GREEDY})
    took_ms = (time.perf_counter() - asked) * 1000

    stream_id = result.headers[STREAM_ID_HEADER]
    logs = upstream.workers[0]
    await eventually(
        lambda: stream_id in engine_first_token_ms("sluice", logs), "the finished line"
    )
    assert 0 < engine_first_token_ms("sluice", logs)[stream_id] < took_ms


async def test_the_bench_proxy_relays_the_engine_and_logs_its_first_token(
    llama_server: LlamaServer, model: str
) -> None:
    """bench/upstream.py's floor, timed by its lean client: the engine's own stream, and the
    engine's first-token time per stream where the bench reads it."""
    body = {"model": model, "messages": USER, "stream": True, **GREEDY}
    with proxy_server(llama_server.v1) as (proxy, url):
        timing = await common.lean_stream(url, "/v1/chat/completions", body)
        stream_id = timing.headers["x-sluice-stream-id"]
        await eventually(lambda: stream_id in engine_first_token_ms("proxy", proxy), "its line")
        engine_ms = engine_first_token_ms("proxy", proxy)[stream_id]
    direct = await common.lean_stream(llama_server.url, "/v1/chat/completions", body)

    assert timing.ok
    assert timing.error == ""
    assert (timing.chars, timing.completion_tokens) == (direct.chars, direct.completion_tokens)
    assert 0 < engine_ms < timing.ttft_after_sent_s * 1000


async def test_a_non_streaming_chat_is_the_engines_own_answer(
    sdks: dict[str, Any], model: str
) -> None:
    body = {"model": model, "messages": USER, "seed": 7, "stop": ["\n\n"], **GREEDY}
    engine = await sdks["engine"].chat.completions.create(**body)

    answer = await sdks["sluice"].chat.completions.create(**body)

    assert answer.choices[0].message.content == engine.choices[0].message.content
    assert answer.choices[0].finish_reason == engine.choices[0].finish_reason
    assert answer.usage.prompt_tokens == engine.usage.prompt_tokens
    assert answer.usage.completion_tokens == engine.usage.completion_tokens


async def test_completions_are_the_engines_own_and_end_with_done(
    client: httpx.AsyncClient, engine: httpx.AsyncClient, model: str
) -> None:
    body = {"model": model, "prompt": "The capital of France is", **GREEDY}
    direct = (await engine.post("/completions", json=body)).json()

    streamed = await stream(client, {**body, "stream": True}, "/v1/completions")
    collected = (await client.post("/v1/completions", json=body)).json()

    assert streamed.status == 200
    assert streamed.events[-1].data == "[DONE]"
    assert not streamed.errors
    assert streamed.text == direct["choices"][0]["text"] == collected["choices"][0]["text"]
    usage = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: collected["usage"][k] for k in usage} == {k: direct["usage"][k] for k in usage}
    assert collected["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"]


def prompt_tokens_counted(url: str, model: str) -> float:
    """`sluice_prompt_tokens_total` of the API at `url`, for `model`."""
    metrics = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text)
    return sum(
        s.value
        for family in metrics
        for s in family.samples
        if s.name == "sluice_prompt_tokens_total" and s.labels == {"model": model}
    )


async def test_the_prompt_tokens_metric_counts_the_engines_count_once(
    client: httpx.AsyncClient, upstream: Stack, model: str
) -> None:
    """The engine tells the prompt's size only at the end of its stream."""
    body = {"model": model, "messages": USER, **GREEDY}
    before = prompt_tokens_counted(upstream.base_url, model)

    streamed = await stream(
        client, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    collected = (await client.post("/v1/chat/completions", json=body)).json()

    prompts = [streamed.chunks[-1]["usage"]["prompt_tokens"], collected["usage"]["prompt_tokens"]]
    assert all(p > 0 for p in prompts)
    assert prompt_tokens_counted(upstream.base_url, model) - before == sum(prompts)


async def test_the_engines_logprobs_reach_the_client_streamed_and_collected(
    client: httpx.AsyncClient, model: str
) -> None:
    # A few tokens: the engine's logprobs cost it time, and this stack's jobs time out at 8 s.
    asked = {"logprobs": True, "top_logprobs": 2, **GREEDY, "max_tokens": 6}
    body = {"model": model, "messages": USER, **asked}

    answer = await client.post("/v1/chat/completions", json=body)
    streamed = await stream(client, {**body, "stream": True})

    assert answer.status_code == 200, answer.text
    collected = answer.json()["choices"][0]
    chunks = [c["choices"][0] for c in streamed.chunks if c["choices"]]
    streamed_entries = [e for c in chunks for e in (c.get("logprobs") or {}).get("content", [])]
    for entries, text in (
        (collected["logprobs"]["content"], collected["message"]["content"]),
        (streamed_entries, streamed.text),
    ):
        assert "".join(e["token"] for e in entries) == text
        for entry in entries:  # greedy: the chosen token is the engine's most likely
            assert [t["token"] for t in entry["top_logprobs"]][:1] == [entry["token"]]
            assert len(entry["top_logprobs"]) == 2
            assert entry["logprob"] <= 0


async def test_legacy_logprobs_through_the_engine_come_in_the_legacy_shape(
    client: httpx.AsyncClient, model: str
) -> None:
    body = {"model": model, "prompt": "The capital of France is", "logprobs": 2, **GREEDY}
    body["max_tokens"] = 6

    answer = await client.post("/v1/completions", json=body)

    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]

    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) > 0
    assert all(
        token in top
        for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True)
    )


async def test_n_the_engine_cannot_serve_comes_back_as_its_own_400(
    client: httpx.AsyncClient, engine: httpx.AsyncClient, model: str
) -> None:
    # llama-server takes `n` up to its slots (4 here). (Below that, it sometimes never answers
    # a request of several choices: the scripted engine's tests cover n that is served.)
    body = {"model": model, "messages": USER, "n": 5, **GREEDY, "max_tokens": 6}
    direct = await engine.post("/chat/completions", json=body)
    assert direct.status_code == 400

    via_sluice = await client.post("/v1/chat/completions", json=body)

    assert via_sluice.status_code == 400
    assert via_sluice.json()["error"]["message"] == direct.json()["error"]["message"]


# --- what the engine refuses ---


async def test_an_engine_refusal_is_its_own_status_and_error(
    client: httpx.AsyncClient, engine: httpx.AsyncClient, model: str
) -> None:
    # Past a slot's context: only the engine, which has the tokenizer, can tell.
    body = {"model": model, "messages": [{"role": "user", "content": long_prompt(6000)}]}
    refused = await engine.post("/chat/completions", json=body)
    assert 400 <= refused.status_code < 500

    collected = await client.post("/v1/chat/completions", json=body)
    streamed = await stream(client, {**body, "stream": True})

    assert collected.status_code == refused.status_code
    expected = {k: refused.json()["error"].get(k) for k in ("message", "type", "code")}
    assert {k: collected.json()["error"][k] for k in expected} == expected
    assert streamed.errors
    assert {k: streamed.errors[-1][k] for k in expected} == expected
    assert streamed.events[-1].data == "[DONE]"


# --- stopping early frees the engine's slot ---


async def test_a_cancel_frees_the_engines_slot_at_once(
    client: httpx.AsyncClient, llama_server: LlamaServer, model: str
) -> None:
    async with client.stream("POST", "/v1/completions", json=counting(model)) as response:
        open_stream = OpenStream(response)
        await open_stream.read_content(3)
        assert llama_server.busy_slots() == 1

        await client.post(f"/v1/streams/{open_stream.stream_id}/cancel")
        freed_after = await wait_idle(llama_server)
        result = await open_stream.rest()

    assert freed_after < 1.0
    assert result.errors[-1]["code"] == "cancelled"
    assert result.events[-1].data == "[DONE]"


async def test_a_client_gone_past_the_resume_grace_frees_the_slot(
    client: httpx.AsyncClient, llama_server: LlamaServer, model: str
) -> None:
    async with client.stream("POST", "/v1/completions", json=counting(model)) as response:
        await OpenStream(response).read_content(2)
    gone = time.monotonic()

    await wait_idle(llama_server)

    assert time.monotonic() - gone < 1 + 3  # the grace (1 s), then a supervisor's look


async def test_a_job_timeout_closes_the_engines_request(
    client: httpx.AsyncClient, llama_server: LlamaServer, model: str
) -> None:
    async with client.stream("POST", "/v1/completions", json=counting(model)) as response:
        open_stream = OpenStream(response)
        await open_stream.read_content(1)
        result = await open_stream.rest()  # until the job's timeout (8 s) ends it
        freed_after = await wait_idle(llama_server)

    assert result.errors
    assert result.events[-1].data == "[DONE]"
    assert freed_after < 1.0


# --- an engine that fails ---


async def test_an_engine_killed_mid_stream_ends_the_stream_with_an_error_then_done(
    fresh: Fresh,
) -> None:
    engine, stack = fresh()
    async with (
        httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=counting("smol")) as response,
    ):
        open_stream = OpenStream(response)
        await open_stream.read_content(3)
        engine.kill()
        result = await open_stream.rest()

    assert result.text
    assert result.errors[-1]["code"] == "upstream_error"
    no_network_detail(result.errors[-1])
    assert result.events[-1].data == "[DONE]"


async def test_an_engine_down_then_back_still_answers(
    fresh: Fresh, llama_server_binary: Path
) -> None:
    engine, stack = fresh()
    engine.kill()  # after its worker started: the worker still takes the job
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        request = asyncio.create_task(stream(client, counting("smol", max_tokens=8)))
        await asyncio.sleep(2)
        assert not request.done()
        back = LlamaServer(llama_server_binary, port=engine.port, slots=1).start()
        try:
            result = await request
        finally:
            back.stop()

    assert not result.errors
    assert result.text
    assert result.events[-1].data == "[DONE]"


async def test_an_engine_that_stays_down_ends_the_stream_as_unavailable(fresh: Fresh) -> None:
    engine, stack = fresh(queue_timeout_s="3")
    engine.kill()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        started = time.monotonic()
        result = await stream(client, counting("smol", max_tokens=8))

    assert time.monotonic() - started >= 3
    assert result.errors[-1]["code"] == "upstream_unavailable"
    no_network_detail(result.errors[-1])
    assert result.events[-1].data == "[DONE]"


async def test_a_worker_whose_engine_is_down_serves_once_the_engine_is_up(
    fresh: Fresh, llama_server_binary: Path
) -> None:
    engine, stack = fresh(down=True, queue_timeout_s="2")
    body = {**counting("smol", max_tokens=4), "stream": False}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        refused = await client.post("/v1/completions", json=body)
        back = LlamaServer(llama_server_binary, port=engine.port, slots=1).start()
        try:
            # The worker finds out by itself (it probes its engine) and claims jobs again.
            served = await answered(lambda: client.post("/v1/completions", json=body))
        finally:
            back.stop()

    assert refused.status_code == 503
    assert served.json()["choices"][0]["text"]


# --- sluice in front of sluice ---


@pytest.fixture(scope="module")
def sluice_behind(redis_server: RedisServer) -> Iterator[tuple[Stack, Stack]]:
    """A synthetic sluice (database 46) as the engine of another sluice (database 47)."""
    back = start_stack(
        "upstream-back",
        redis_server.url(46),
        1,
        backend="synthetic",
        synthetic_tokens_per_s="5",  # a stream of 90 words lasts 18 s
        worker_max_jobs="1",  # a second job waits, silent, until the first is done
        resume_grace_s="0.5",
        drain_s="1",  # at teardown a job may still run, its reader gone with the front
    )
    try:
        front = start_stack(
            "upstream-front",
            redis_server.url(47),
            1,
            backend="openai",
            upstream_url=f"{back.base_url}/v1",
            served_model_name="front",
        )
    except BaseException:
        back.stop()
        raise
    yield back, front
    front.stop()
    back.stop()


async def test_a_stream_through_two_sluices_resumes_on_the_front(
    sluice_behind: tuple[Stack, Stack],
) -> None:
    _, front = sluice_behind
    body = {"model": "front", "messages": [{"role": "user", "content": "relay"}], "stream": True}
    async with httpx.AsyncClient(base_url=front.base_url, timeout=60) as client:
        first = await stream(client, {**body, "max_tokens": 12}, cut_after=4)
        stream_id = first.headers[STREAM_ID_HEADER]
        rest = await stream(client, path=f"/v1/streams/{stream_id}?after={first.events[-1].id}")

    assert (first.text + rest.text).startswith("You asked: relay\n\nStreaming sends each")
    assert not rest.errors
    assert rest.events[-1].data == "[DONE]"


async def test_a_cancel_on_the_front_sluice_ends_the_stream_behind_it(
    sluice_behind: tuple[Stack, Stack], redis_server: RedisServer
) -> None:
    _, front = sluice_behind
    body = {"model": "front", "prompt": "cancel me", "stream": True}
    with redis_server.client(46) as back_redis:
        await eventually(lambda: back_redis.zcard(ACTIVE_KEY) == 0, "no stream behind")
        async with (
            httpx.AsyncClient(base_url=front.base_url, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=body) as response,
        ):
            open_stream = OpenStream(response)
            await open_stream.read_content(2)
            [behind] = back_redis.zrange(ACTIVE_KEY, 0, -1)
            await client.post(f"/v1/streams/{open_stream.stream_id}/cancel")
            result = await open_stream.rest()
        # The front worker hung up on the sluice behind, which ends that stream after its
        # resume grace; left alone, it would run on for 15 s more.
        cancelled = time.monotonic()
        await eventually(lambda: back_redis.zcard(ACTIVE_KEY) == 0, "the stream behind to end")
        [(_, last)] = back_redis.xrevrange(stream_key(behind.decode()), count=1)

    assert time.monotonic() - cancelled < 5
    assert isinstance(ended := from_fields(last), Failed)
    assert ended.error["code"] == "cancelled"
    assert result.errors[-1]["code"] == "cancelled"
    assert result.events[-1].data == "[DONE]"


async def test_a_cancel_while_the_engine_is_silent_ends_the_stream_at_once(
    sluice_behind: tuple[Stack, Stack],
) -> None:
    """The engine has not said anything yet (here the job waits behind another in the sluice
    behind): the cancel must close the request now, not when the engine next speaks."""
    back, front = sluice_behind
    blocking = {"model": "synthetic", "prompt": "block", "max_tokens": 60, "stream": True}
    body = {"model": "front", "messages": [{"role": "user", "content": "wait"}], "stream": True}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{back.base_url}/v1/completions", json=blocking) as blocker,
    ):
        blocking_stream = OpenStream(blocker)  # held: one let go would close its response
        await blocking_stream.read_content(1)  # the one job the sluice behind runs
        async with client.stream(
            "POST", f"{front.base_url}/v1/chat/completions", json=body
        ) as response:
            open_stream = OpenStream(response)
            await open_stream.read_event()  # the role: the front's job has started
            await asyncio.sleep(0.5)
            cancelled = time.monotonic()
            await client.post(f"{front.base_url}/v1/streams/{open_stream.stream_id}/cancel")
            result = await open_stream.rest()
            ended_after = time.monotonic() - cancelled
        await client.post(f"{back.base_url}/v1/streams/{blocking_stream.stream_id}/cancel")

    assert ended_after < 2  # the engine's first token was 10 s away
    assert result.errors[-1]["code"] == "cancelled"
    assert result.events[-1].data == "[DONE]"
