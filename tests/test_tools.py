"""Tools and structured outputs on the real model (issue 22), through the official openai SDK:
its stream helpers, `.parse()`, an agent loop's two turns, the Responses API's function calls;
the raw stream in OpenAI's canonical shape, resumed inside a call; bad input refused by name.

SmolLM2-135M is tiny: under a grammar a forced call always parses and fits its schema, and what
`auto` chooses is the model's business. These check shapes and validity, not wisdom. Tools'
arguments use enums, so that every answer ends well within `max_tokens`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.procs import Stack
from tests.sse import stream
from tests.test_readme import runnable_blocks
from tests.tool_streams import accumulated, assert_canonical

pytestmark = pytest.mark.model

CITIES = ["Paris", "London", "Tokyo"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: Literal["Paris", "London", "Tokyo"]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: Literal[0, 2, 4]
    friendly: bool


@pytest.fixture
def sdk(model: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{model.base_url}/v1", api_key="unused", timeout=120) as client:
        yield client


@pytest.fixture
async def api(model: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=model.base_url, timeout=120) as client:
        yield client


def test_sync_stream_helper_accumulates_a_required_call_with_parsed_arguments(
    sdk: openai.OpenAI, model_name: str
) -> None:
    with sdk.chat.completions.stream(
        model=model_name,
        messages=ASK,  # type: ignore[arg-type]
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    ) as events:
        kinds = [event.type for event in events]
        final = events.get_final_completion()

    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert "tool_calls.function.arguments.done" in kinds


async def test_async_stream_helper_calls_the_named_strict_tool(
    model: Stack, model_name: str
) -> None:
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    sdk = openai.AsyncOpenAI(base_url=f"{model.base_url}/v1", api_key="unused")
    async with (
        sdk,
        sdk.chat.completions.stream(
            model=model_name,
            messages=ASK,  # type: ignore[arg-type]
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
        ) as events,
    ):
        final = await events.get_final_completion()

    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert final.usage is None or final.usage.completion_tokens > 0


def test_parse_returns_the_pydantic_object(sdk: openai.OpenAI, model_name: str) -> None:
    completion = sdk.chat.completions.parse(
        model=model_name,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        response_format=Pet,
        max_tokens=60,
        temperature=0,
    )

    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Pet)


def test_json_object_answers_one_json_object(sdk: openai.OpenAI, model_name: str) -> None:
    completion = sdk.chat.completions.create(
        model=model_name,
        messages=[
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": 'Give a JSON object with one key, "color", and a value.'},
        ],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )

    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_a_two_turn_tool_loop(sdk: openai.OpenAI, model_name: str) -> None:
    first = sdk.chat.completions.create(
        model=model_name,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    )
    asked = first.choices[0].message
    [call] = asked.tool_calls or []
    reply = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}
    second = sdk.chat.completions.create(
        model=model_name,
        messages=[*ASK, asked.model_dump(exclude_none=True), reply],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=30,
        temperature=0,
    )

    assert first.choices[0].finish_reason == "tool_calls"
    assert asked.content is None
    assert json.loads(call.function.arguments)["city"] in CITIES
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content
    assert not second.choices[0].message.tool_calls


async def test_auto_answers_text_or_a_call_that_fits(api: httpx.AsyncClient) -> None:
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 60}

    answer = (await api.post("/v1/chat/completions", json=body)).json()["choices"][0]

    if answer["finish_reason"] == "tool_calls":
        [call] = answer["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"])["city"] in CITIES
    else:
        assert answer["message"]["content"]
        assert "tool_calls" not in answer["message"]


async def test_parallel_calls_are_canonical_and_resume_inside_the_arguments(
    api: httpx.AsyncClient,
) -> None:
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris and in Tokyo?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": True,
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
    }
    whole = await stream(api, body)
    assert_canonical(whole.chunks)
    expected = accumulated(whole.chunks)
    assert expected["finish_reason"] == "tool_calls"
    assert all(json.loads(args)["city"] in CITIES for _, args in expected["calls"])

    ids = [(n, e.id) for n, e in enumerate(whole.events) if e.id]
    inside = [(n, i) for n, i in ids if _argument_fragments(whole.events[n].json)]
    assert inside, "no event inside a call's arguments"
    cuts = [ids[0], ids[1], inside[len(inside) // 2], ids[-2]]
    stream_id = whole.headers["x-sluice-stream-id"]
    for n, last_seen in cuts:
        rest = await stream(
            api, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": last_seen}
        )
        before = [e.json for e in whole.events[: n + 1]]
        assert accumulated(before + rest.chunks) == expected, f"cut after event {n}"


def test_responses_function_call_then_its_output_continues_the_conversation(
    sdk: openai.OpenAI, model_name: str
) -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        **{k: v for k, v in WEATHER["function"].items() if k != "name"},
    }
    events = list(
        sdk.responses.create(
            model=model_name,
            input="What is the weather in Paris?",
            tools=[tool],  # type: ignore[list-item]
            tool_choice="required",
            max_output_tokens=40,
            stream=True,
        )
    )
    first = events[-1].response  # type: ignore[union-attr]
    [call] = [item for item in first.output if item.type == "function_call"]
    second = sdk.responses.create(
        model=model_name,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."}],
        tools=[tool],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=20,
    )

    kinds = [e.type for e in events]
    added = kinds.index("response.output_item.added")
    assert kinds[added + 1] == "response.function_call_arguments.delta"
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(call.arguments)["city"] in CITIES
    assert second.status in ("completed", "incomplete")
    assert second.output_text


@pytest.mark.parametrize("code", [code for _, code in runnable_blocks(tools=True)])
def test_the_readmes_tool_example_runs_on_the_real_model(model: Stack, code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code.replace("http://localhost:8080", model.base_url)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("city=")


# --- refused by name ---


async def test_a_schema_keyword_the_grammar_would_drop_is_a_400_naming_it(
    api: httpx.AsyncClient,
) -> None:
    parameters = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    tool = {"type": "function", "function": {"name": "count", "parameters": parameters}}
    body = {"messages": ASK, "tools": [tool], "tool_choice": "required"}

    answer = await api.post("/v1/chat/completions", json=body)

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "tools[0].function.parameters.properties.n.minimum"


async def test_a_grammar_llama_cpp_cannot_build_is_a_400_before_any_token(
    api: httpx.AsyncClient,
) -> None:
    schema = {"type": "object", "properties": {"x": {"enum": []}}, "required": ["x"]}
    format = {"type": "json_schema", "json_schema": {"name": "never", "schema": schema}}
    body = {"messages": ASK, "response_format": format}

    collected = await api.post("/v1/chat/completions", json=body)
    streamed = await stream(api, {**body, "stream": True})

    assert collected.status_code == 400
    assert collected.json()["error"]["param"] == "response_format.json_schema.schema"
    assert streamed.errors[0]["param"] == "response_format.json_schema.schema"
    assert streamed.text == ""
    assert streamed.events[-1].data == "[DONE]"


def _argument_fragments(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The deltas of `chunk` that continue a call's arguments (not a call's first)."""
    return [
        delta
        for choice in chunk.get("choices", [])
        for delta in choice.get("delta", {}).get("tool_calls") or []
        if "id" not in delta
    ]
