"""The official `openai` Python SDK, pointed at sluice by `base_url`, works unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.procs import Stack

USER = [{"role": "user", "content": "tell me about queues"}]


@pytest.fixture
def sdk(synthetic: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{synthetic.base_url}/v1", api_key="unused") as client:
        yield client


@pytest.fixture
async def async_sdk(synthetic: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{synthetic.base_url}/v1", api_key="unused")


def test_sync_streaming_yields_content_and_a_finish_reason(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model="synthetic", messages=USER, stream=True))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("You asked: tell me about queues")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sync_non_streaming_returns_message_and_usage(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model="synthetic", messages=USER, max_tokens=4)

    assert completion.choices[0].message.content == "You asked: tell me"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4


async def test_async_streaming_with_include_usage_ends_with_a_usage_chunk(
    async_sdk: openai.AsyncOpenAI,
) -> None:
    async with async_sdk:
        stream = await async_sdk.chat.completions.create(
            model="synthetic",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]

    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


async def test_async_non_streaming_legacy_completion(async_sdk: openai.AsyncOpenAI) -> None:
    async with async_sdk:
        completion = await async_sdk.completions.create(
            model="synthetic", prompt="legacy prompt", max_tokens=3
        )

    assert completion.object == "text_completion"
    assert completion.choices[0].text == "You asked: legacy"
    assert completion.usage is not None


def test_legacy_completion_streams_text_chunks(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.completions.create(model="synthetic", prompt="legacy stream", stream=True))

    assert "".join(c.choices[0].text for c in chunks).startswith("You asked: legacy stream")
    assert chunks[-1].choices[0].finish_reason == "length"  # OpenAI's default max_tokens is 16


def test_models_lists_the_served_model(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["synthetic"]
    assert sdk.models.retrieve("synthetic").id == "synthetic"


def test_bad_request_raises_the_sdks_bad_request_error_with_our_message(
    sdk: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="synthetic", messages=USER, n=9)

    assert raised.value.status_code == 400
    assert "less than or equal to 8" in raised.value.message
    assert raised.value.param == "n"


def test_unknown_model_raises_not_found_error(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=USER)

    assert raised.value.code == "model_not_found"


def test_stop_string_spanning_tokens_is_not_sent(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="synthetic",
        messages=[{"role": "user", "content": "x"}],
        stop=["client as soon"],
    )

    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content is not None
    assert completion.choices[0].message.content.endswith("each token to the ")


def test_text_parts_and_developer_role_are_accepted(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="synthetic",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}]},
        ],
        max_tokens=4,
    )

    assert completion.choices[0].message.content == "You asked: part one"
