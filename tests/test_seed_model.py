"""The seed contract, end to end, on the real model."""

from __future__ import annotations

import httpx
import pytest

from tests.sse import stream

pytestmark = pytest.mark.model


async def test_seed_request_streams_a_real_answer_in_many_chunks(
    model_client: httpx.AsyncClient,
) -> None:
    # Seeded, so the test sees the same answer every run (the bench measures unseeded runs).
    body = {"prompt": "Explain streaming APIs", "stream": True, "seed": 7}
    result = await stream(model_client, body)

    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.events[-1].data == "[DONE]"
    chunks = result.chunks
    assert len(chunks) >= 6
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(isinstance(c["choices"][0]["delta"]["content"], str) for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(result.text) > 1375
    assert "stream" in result.text.lower()  # relevant to the prompt


async def test_openai_messages_without_stream_returns_one_completion(
    model_client: httpx.AsyncClient,
) -> None:
    response = await model_client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 40,
            "temperature": 0,
        },
    )

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 40
    assert body["usage"]["prompt_tokens"] > 5


async def test_same_seed_and_prompt_give_the_same_text(model_client: httpx.AsyncClient) -> None:
    body = {
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 30,
        "temperature": 0.9,
        "seed": 1234,
    }
    first, second = [
        (await model_client.post("/v1/chat/completions", json=body)).json() for _ in range(2)
    ]

    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"] == second["usage"]


async def test_sampling_left_out_is_the_models_default(model_client: httpx.AsyncClient) -> None:
    """The API passes on only what the client gave; the llama backend fills in its defaults
    (`SLUICE_DEFAULT_TEMPERATURE` 0.6, `SLUICE_DEFAULT_TOP_P` 0.9), as the API once did."""
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40}

    async def text(**sampling: float) -> str:
        answer = await model_client.post("/v1/chat/completions", json=body | {"seed": 5} | sampling)
        content: str = answer.json()["choices"][0]["message"]["content"]
        return content

    left_out = await text()

    assert left_out == await text(temperature=0.6, top_p=0.9)
    assert left_out != await text(temperature=1.0, top_p=1.0)  # sampling shows in the text
