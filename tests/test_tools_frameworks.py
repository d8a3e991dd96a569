"""Agent frameworks against sluice's tools and structured outputs (issue 22), on the real model,
unchanged but for their base URL: LangChain (`bind_tools`, `with_structured_output`), the OpenAI
Agents SDK (a function tool through `/v1/responses`) and the Vercel AI SDK on Node.js
(`streamText` with a zod tool, `generateObject`, over Chat Completions and Responses)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Literal

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic import BaseModel

from tests.prereqs import npm_packages
from tests.procs import Stack

pytestmark = pytest.mark.model

JS = Path(__file__).parent / "js"
City = Literal["Paris", "London", "Tokyo"]


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: City


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    friendly: bool


@pytest.fixture
def chat_model(model: Stack, model_name: str) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{model.base_url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        model=model_name,
        temperature=0,
        max_completion_tokens=40,
    )


def test_langchain_bind_tools_with_a_named_tool_choice_calls_it(chat_model: ChatOpenAI) -> None:
    bound = chat_model.bind_tools([GetWeather], tool_choice="GetWeather")

    invoked = bound.invoke("What is the weather in Paris?")
    streamed: Any = None
    for chunk in bound.stream("What is the weather in London?"):
        streamed = chunk if streamed is None else streamed + chunk

    for message in (invoked, streamed):
        [call] = message.tool_calls
        assert call["name"] == "GetWeather"
        assert GetWeather.model_validate(call["args"])
        assert call["id"]


def test_langchain_structured_output_by_json_schema(chat_model: ChatOpenAI) -> None:
    structured = chat_model.with_structured_output(Pet, method="json_schema")

    assert isinstance(structured.invoke("Describe a pet."), Pet)


@function_tool
def get_weather(city: City) -> str:
    """The current weather in a city."""
    return f"Sunny in {city}, 24 C"


async def test_the_agents_sdk_runs_a_function_tool_through_responses(
    model: Stack, model_name: str
) -> None:
    set_tracing_disabled(True)  # its traces would go to OpenAI
    async with AsyncOpenAI(base_url=f"{model.base_url}/v1", api_key="unused") as client:
        agent = Agent(
            name="weather",
            instructions="Use the tool.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model=model_name, openai_client=client),
            model_settings=ModelSettings(tool_choice="required", max_tokens=40, temperature=0),
            tool_use_behavior="stop_on_first_tool",
        )
        result = await Runner.run(agent, "What is the weather in Paris?")

    call, output = result.new_items
    assert isinstance(call, ToolCallItem)
    assert isinstance(output, ToolCallOutputItem)
    assert result.final_output.startswith("Sunny in ")


@pytest.fixture(scope="module")
def ai_sdk() -> Path:
    npm_packages(JS, "ai")
    return JS / "ai_sdk_client.mjs"


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_the_vercel_ai_sdk_streams_a_zod_tool_call_and_generates_an_object(
    ai_sdk: Path, seen_by_ai_sdk: dict[str, Any], api: str
) -> None:
    seen = seen_by_ai_sdk[api]

    assert seen["calls"] == [
        {"name": "get_weather", "input": {"city": seen["calls"][0]["input"]["city"]}}
    ]
    assert seen["calls"][0]["input"]["city"] in ("Paris", "London", "Tokyo")
    assert seen["finish"] == "tool-calls"
    assert "tool-input-delta" in seen["parts"]
    assert "error" not in seen["parts"]
    assert seen["object"]["kind"] in ("cat", "dog", "fish")
    assert isinstance(seen["object"]["friendly"], bool)


@pytest.fixture(scope="module")
def seen_by_ai_sdk(ai_sdk: Path, model: Stack, model_name: str) -> dict[str, Any]:
    done = subprocess.run(
        ["node", str(ai_sdk)],
        env={
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "SLUICE_BASE_URL": f"{model.base_url}/v1",
            "SLUICE_MODEL": model_name,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen
