"""The pipeline on the synthetic backend: OpenAI format, collected responses, many streams."""

from __future__ import annotations

import asyncio

import httpx

from tests.sse import stream


async def test_messages_format_streams_chunks_then_done(client: httpx.AsyncClient) -> None:
    result = await stream(
        client, {"messages": [{"role": "user", "content": "hello there"}], "stream": True}
    )

    assert result.status == 200
    assert result.events[-1].data == "[DONE]"
    assert result.text.startswith("You asked: hello there")
    assert result.chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(e.id for e in result.events[:-1])


async def test_stream_false_collects_the_same_text(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "collect me"}]}
    streamed = await stream(client, {**body, "stream": True})
    collected = await client.post("/v1/chat/completions", json=body)

    assert collected.status_code == 200
    completion = collected.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == streamed.text
    assert completion["usage"]["total_tokens"] == (
        completion["usage"]["prompt_tokens"] + completion["usage"]["completion_tokens"]
    )


async def test_max_tokens_ends_the_stream_with_length(client: httpx.AsyncClient) -> None:
    result = await stream(
        client, {"prompt": "count", "stream": True, "max_tokens": 5, "min_tokens": 0}
    )

    assert result.chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(result.text.split()) == 5


async def test_backend_error_mid_stream_sends_error_event_then_done(
    client: httpx.AsyncClient,
) -> None:
    result = await stream(client, {"prompt": "break [[fail after 4]]", "stream": True})

    assert result.status == 200
    assert result.events[-1].data == "[DONE]"
    assert result.errors == [
        {
            "message": "synthetic failure after 4 tokens",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    ]
    assert result.text.startswith("You asked:")


async def test_many_concurrent_streams_complete_in_order_without_cross_talk(
    client: httpx.AsyncClient,
) -> None:
    prompts = [f"stream number {n}" for n in range(60)]
    results = await asyncio.gather(
        *(stream(client, {"prompt": p, "stream": True}) for p in prompts)
    )

    for prompt, result in zip(prompts, results, strict=True):
        assert result.events[-1].data == "[DONE]"
        assert result.text.startswith(f"You asked: {prompt}\n\n")
        assert result.text.endswith("will never come.")
        ids = [e.id for e in result.events if e.id]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
