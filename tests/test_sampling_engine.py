"""logprobs, `n`, `logit_bias`, image parts and fields sluice does not know, through an engine
(issue 28): a scripted engine (tests/upstreams.py) records what it is sent and answers with as
many choices and logprobs as it is asked for; the client gets them, from the stream's entries.

The module's stack runs on database 10.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.procs import RedisServer, Stack, start_stack
from tests.sse import SSEResult, stream
from tests.upstreams import ScriptedEngine, scripted_logprob, scripted_word

MODEL = ScriptedEngine.MODEL
USER = [{"role": "user", "content": "Name three rivers."}]
WORDS = 3
ENGINE_FIELDS = {
    "top_k": 20,
    "repetition_penalty": 1.05,
    "chat_template_kwargs": {"enable_thinking": False},
    "user": "someone",
}
"""vLLM's extensions and a field of OpenAI's that sluice does not read."""


@pytest.fixture(scope="module")
def engine() -> Iterator[ScriptedEngine]:
    scripted = ScriptedEngine(words=WORDS).start()
    yield scripted
    scripted.stop()


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, engine: ScriptedEngine) -> Iterator[Stack]:
    running = start_stack(
        "sampling-engine",
        redis_server.fresh_url(10),
        1,
        backend="openai",
        upstream_url=engine.v1,
        upstream_model=MODEL,
    )
    yield running
    running.stop()


@pytest.fixture
async def api(stack: Stack, engine: ScriptedEngine) -> AsyncIterator[httpx.AsyncClient]:
    engine.bodies.clear()
    engine.refuses = set()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        yield client


def choice_texts(result: SSEResult) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in result.chunks:
        for choice in chunk.get("choices", []):
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return texts


def expected_text(index: int) -> str:
    return "".join(scripted_word(index, n) for n in range(WORDS))


async def test_fields_sluice_does_not_know_and_sampling_reach_the_engine_as_sent(
    api: httpx.AsyncClient, engine: ScriptedEngine
) -> None:
    body = {
        "model": MODEL,
        "messages": USER,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"42": -100, "7": 5.5},
        "max_tokens": 9,
        **ENGINE_FIELDS,
    }

    response = await api.post("/v1/chat/completions", json=body)

    assert response.status_code == 200, response.text
    [sent] = engine.bodies
    assert {k: sent[k] for k in (*ENGINE_FIELDS, "n", "top_logprobs", "logit_bias")} == {
        **ENGINE_FIELDS,
        "n": 2,
        "top_logprobs": 2,
        "logit_bias": {"42": -100, "7": 5.5},
    }
    assert sent["logprobs"] is True
    # sluice's own: it streams from the engine, names its model, keeps its limits
    assert (sent["stream"], sent["model"], sent["max_tokens"]) == (True, MODEL, 9)
    assert sent["stream_options"] == {"include_usage": True}


async def test_image_and_audio_parts_reach_the_engine_as_sent(
    api: httpx.AsyncClient, engine: ScriptedEngine
) -> None:
    parts = [
        {"type": "text", "text": "What is in these?"},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
        },
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ]
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}

    response = await api.post("/v1/chat/completions", json=body)

    assert response.status_code == 200, response.text
    assert engine.bodies[0]["messages"] == [{"role": "user", "content": parts}]


async def test_the_engines_choices_and_logprobs_stream_and_replay_alike(
    api: httpx.AsyncClient,
) -> None:
    body = {"model": MODEL, "messages": USER, "stream": True, "n": 3}
    body |= {"logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}}

    live = await stream(api, body)
    replay = await stream(api, None, f"/v1/streams/{live.headers['x-sluice-stream-id']}")

    assert choice_texts(live) == {i: expected_text(i) for i in range(3)}
    for index in range(3):
        entries = [
            entry
            for chunk in live.chunks
            for choice in chunk.get("choices", [])
            if choice["index"] == index and choice.get("logprobs")
            for entry in choice["logprobs"]["content"]
        ]
        assert [e["token"] for e in entries] == [scripted_word(index, n) for n in range(WORDS)]
        assert {e["logprob"] for e in entries} == {scripted_logprob(index)}
        assert all(len(e["top_logprobs"]) == 1 for e in entries)
    reasons = [
        (choice["index"], choice["finish_reason"])
        for chunk in live.chunks
        for choice in chunk.get("choices", [])
        if choice.get("finish_reason")
    ]
    assert sorted(reasons) == [(0, "stop"), (1, "stop"), (2, "stop")]
    assert live.chunks[-1]["usage"]["completion_tokens"] == 3 * WORDS
    assert [e.data for e in replay.events] == [e.data for e in live.events]


async def test_the_engines_choices_and_logprobs_come_collected(api: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": USER, "n": 2, "logprobs": True}

    response = await api.post("/v1/chat/completions", json=body)

    choices = response.json()["choices"]
    assert [c["message"]["content"] for c in choices] == [expected_text(0), expected_text(1)]
    assert [c["finish_reason"] for c in choices] == ["stop", "stop"]
    assert [len(c["logprobs"]["content"]) for c in choices] == [WORDS, WORDS]


async def test_legacy_logprobs_through_an_engine_keep_their_shape(
    api: httpx.AsyncClient, engine: ScriptedEngine
) -> None:
    body = {"model": MODEL, "prompt": "Rivers:", "logprobs": 2, "max_tokens": 9}

    response = await api.post("/v1/completions", json=body)

    assert engine.bodies[0]["logprobs"] == 2
    choice: dict[str, Any] = response.json()["choices"][0]
    words = [scripted_word(0, n) for n in range(WORDS)]
    assert choice["logprobs"] == {
        "tokens": words,
        "token_logprobs": [scripted_logprob(0)] * WORDS,
        "top_logprobs": [{w: scripted_logprob(0), "other": scripted_logprob(0) - 1} for w in words],
        "text_offset": [len("".join(words[:k])) for k in range(WORDS)],
    }


async def test_what_the_engine_refuses_comes_back_as_its_400(
    api: httpx.AsyncClient, engine: ScriptedEngine
) -> None:
    engine.refuses = {"top_k"}

    response = await api.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": USER, "top_k": 5}
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "top_k" in error["message"]
