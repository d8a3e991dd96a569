"""Tools through an engine (`SLUICE_BACKEND=openai`, issue 22): what the client sent reaches the
engine as sent, and what comes back is OpenAI's canonical shape whatever the engine's habits,
each reproduced by a scripted engine (tests/upstreams.py `ScriptedEngine`, mode `script`). A
tool-call stream resumes at any entry, inside a call's arguments too, on chat and Responses.

The module's stacks run on databases 49 and 50.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.procs import RedisServer, Stack, start_stack
from tests.sse import stream
from tests.tool_streams import accumulated, assert_canonical
from tests.upstreams import LlamaServer, ScriptedEngine

MODEL = ScriptedEngine.MODEL
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": True,
        "x-vendor": "kept",
    },
}
USER = [{"role": "user", "content": "What is the weather in Paris and the time there?"}]
USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def calls(*deltas: dict[str, Any]) -> dict[str, Any]:
    return chunk({"tool_calls": list(deltas)})


def call(
    index: int | None, fragment: str, *, name: str | None = None, id: str | None = None
) -> dict[str, Any]:
    """An engine's tool-call delta: with `name`, a call's opening (with `id` and `type`)."""
    delta: dict[str, Any] = {"function": {"arguments": fragment}}
    if index is not None:
        delta["index"] = index
    if name is not None:
        delta |= {"id": id, "type": "function"}
        delta["function"]["name"] = name
    return delta


ROLE = chunk({"role": "assistant", "content": None})
PARIS = ("get_weather", '{"city": "Paris"}')
CET = ("get_time", '{"zone": "CET"}')

HABITS: dict[str, list[dict[str, Any]]] = {
    # llama-cpp-python, LiteLLM #20480: id, type and name on every chunk of a call
    "id_and_name_repeated": [
        ROLE,
        calls(call(0, "", name="get_weather", id="call_w")),
        calls(call(0, '{"city": ', name="get_weather", id="call_w")),
        calls(call(0, '"Paris"}', name="get_weather", id="call_w")),
        calls(call(1, "", name="get_time", id="call_t")),
        calls(call(1, '{"zone": "CET"}', name="get_time", id="call_t")),
        chunk({}, "tool_calls"),
        USAGE,
    ],
    # Ollama #7881: each call whole, in one chunk, without `index`
    "no_index": [
        ROLE,
        calls(call(None, '{"city": "Paris"}', name="get_weather", id="call_w")),
        calls(call(None, '{"zone": "CET"}', name="get_time", id="call_t")),
        chunk({}, "tool_calls"),
        USAGE,
    ],
    # vLLM, LiteLLM #12862: `stop` after tool calls
    "stop_after_calls": [
        ROLE,
        calls(call(0, "", name="get_weather", id="call_w")),
        calls(call(0, '{"city": "Paris"}')),
        calls(call(1, "", name="get_time", id="call_t")),
        calls(call(1, '{"zone": '), call(1, '"CET"}')),
        chunk({}, "stop"),
        USAGE,
    ],
    # OpenRouter: two finish chunks, the second with the usage
    "two_finishes": [
        ROLE,
        calls(call(0, '{"city": "Paris"}', name="get_weather", id="call_w")),
        calls(call(1, '{"zone": "CET"}', name="get_time", id="call_t")),
        chunk({}, "tool_calls"),
        chunk({}, "tool_calls") | {"usage": USAGE["usage"]},
    ],
    # indices from 1, arguments as a JSON object, no id: an engine's own numbering and types
    "own_numbering": [
        ROLE,
        calls({"index": 1, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}),
        calls({"index": 2, "function": {"name": "get_time", "arguments": {"zone": "CET"}}}),
        chunk({}, "tool_calls"),
        USAGE,
    ],
}


@pytest.fixture(scope="module")
def engine() -> Iterator[ScriptedEngine]:
    scripted = ScriptedEngine("script").start()
    yield scripted
    scripted.stop()


@pytest.fixture(scope="module")
def engine_stack(redis_server: RedisServer, engine: ScriptedEngine) -> Iterator[Stack]:
    stack = start_stack(
        "tools-engines",
        redis_server.fresh_url(49),
        1,
        backend="openai",
        upstream_url=engine.v1,
        upstream_model=MODEL,
    )
    yield stack
    stack.stop()


@pytest.fixture
async def api(engine_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=engine_stack.base_url, timeout=60) as client:
        yield client


def request(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "tools": [WEATHER], "stream": True, **fields}


@pytest.mark.parametrize("habit", sorted(HABITS))
async def test_an_engines_tool_calls_reach_the_client_in_the_canonical_shape(
    api: httpx.AsyncClient, engine: ScriptedEngine, habit: str
) -> None:
    engine.script = HABITS[habit]

    result = await stream(api, request())

    assert not result.errors
    assert_canonical(result.chunks)
    seen = accumulated(result.chunks)
    assert seen["calls"] == [PARIS, CET]
    assert seen["finish_reason"] == "tool_calls"
    assert len(set(seen["ids"])) == 2


@pytest.mark.parametrize("habit", ["id_and_name_repeated", "stop_after_calls", "no_index"])
async def test_a_collected_answer_has_the_calls_no_content_and_finish_tool_calls(
    api: httpx.AsyncClient, engine: ScriptedEngine, habit: str
) -> None:
    engine.script = HABITS[habit]

    answer = (await api.post("/v1/chat/completions", json=request(stream=False))).json()

    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    made = [
        (c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]
    ]
    assert made == [PARIS, CET]
    assert all(c["type"] == "function" and c["id"] for c in choice["message"]["tool_calls"])
    assert answer["usage"]["completion_tokens"] == 7


async def test_tools_and_formats_and_tool_messages_reach_the_engine_as_sent(
    api: httpx.AsyncClient, engine: ScriptedEngine
) -> None:
    engine.script = [ROLE, chunk({"content": "Sunny."}), chunk({}, "stop"), USAGE]
    made = {
        "id": "call_w",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [made]},
        {"role": "tool", "tool_call_id": "call_w", "content": "sunny, 24 C"},
    ]
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = request(
        messages=messages,
        tool_choice=choice,
        parallel_tool_calls=False,
        response_format=format,
    )

    result = await stream(api, body)

    sent = engine.bodies[-1]
    assert result.text == "Sunny."
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == choice
    assert sent["parallel_tool_calls"] is False
    assert sent["response_format"] == format
    assert sent["messages"] == messages


# --- resumable ---

RESUMED = [
    ROLE,
    chunk({"content": "Let me look."}),
    calls(call(0, "", name="get_weather", id="call_w")),
    calls(call(0, '{"ci')),
    calls(call(0, 'ty": "Pa')),
    calls(call(0, 'ris"}')),
    calls(call(1, "", name="get_time", id="call_t")),
    calls(call(1, '{"zone": "CET"}')),
    chunk({}, "tool_calls"),
    USAGE,
]


async def test_a_tool_call_stream_resumed_at_every_entry_gives_the_same_calls(
    api: httpx.AsyncClient, engine: ScriptedEngine
) -> None:
    engine.script = RESUMED
    whole = await stream(api, request())
    stream_id = whole.headers["x-sluice-stream-id"]
    expected = accumulated(whole.chunks)
    assert expected["calls"] == [PARIS, CET]
    assert expected["content"] == "Let me look."

    ids = [event.id for event in whole.events if event.id]
    assert len(ids) >= 8  # role, text, two openings, four argument fragments, finish
    for cut, last_seen in enumerate(ids):
        before = [e.json for e in whole.events[: cut + 1]]
        rest = await stream(
            api, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": last_seen}
        )
        assert rest.events[-1].data == "[DONE]"
        again = accumulated(before + rest.chunks)
        assert again == expected, f"cut after event {cut}"


async def test_a_function_call_response_replays_from_any_event(
    engine_stack: Stack, engine: ScriptedEngine
) -> None:
    engine.script = RESUMED
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER["function"]["parameters"],
    }
    with openai.OpenAI(base_url=f"{engine_stack.base_url}/v1", api_key="unused") as sdk:
        events = list(
            sdk.responses.create(
                model=MODEL, input="weather?", tools=[tool], stream=True, background=True
            )
        )
        resp_id = events[0].response.id  # type: ignore[union-attr]
        kinds = [e.type for e in events]
        done = sdk.responses.retrieve(resp_id)
        replays = [
            list(sdk.responses.retrieve(resp_id, stream=True, starting_after=n))
            for n in range(-1, len(events) - 1)
        ]

    assert kinds.count("response.output_item.added") == 3  # the text, then two calls
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-1] == "response.completed"
    calls_made = [(i.name, i.arguments) for i in done.output if i.type == "function_call"]
    assert calls_made == [PARIS, CET]
    assert [i.call_id for i in done.output if i.type == "function_call"] == ["call_w", "call_t"]
    assert done.output_text == "Let me look."
    for n, replay in enumerate(replays, start=-1):
        assert [e.model_dump(exclude={"response"}) for e in replay] == [
            e.model_dump(exclude={"response"}) for e in events[n + 1 :]
        ]


# --- a real engine ---


@pytest.fixture(scope="module")
def llama_server_stack(redis_server: RedisServer, llama_server: LlamaServer) -> Iterator[Stack]:
    """An `openai` worker in front of llama.cpp's own server (database 50). Its structured
    outputs are llama-server's own grammar; its tool calling on SmolLM2 answers plain text even
    under `tool_choice: required`, so only the scripted engine above tests calls through one."""
    stack = start_stack(
        "tools-llama-server",
        redis_server.fresh_url(50),
        1,
        backend="openai",
        upstream_url=llama_server.v1,
    )
    yield stack
    stack.stop()


async def test_a_json_schema_through_llama_server_streams_json_that_fits_and_resumes(
    llama_server_stack: Stack,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["cat", "dog", "fish"]},
            "friendly": {"type": "boolean"},
        },
        "required": ["kind", "friendly"],
        "additionalProperties": False,
    }
    body = {
        "messages": [{"role": "user", "content": "Describe a pet as JSON."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": schema},
        },
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=llama_server_stack.base_url, timeout=120) as client:
        whole = await stream(client, body)
        ids = [(n, e.id) for n, e in enumerate(whole.events) if e.id]
        n, middle = ids[len(ids) // 2]
        rest = await stream(
            client,
            path=f"/v1/streams/{whole.headers['x-sluice-stream-id']}",
            headers={"Last-Event-ID": middle},
        )

    pet = json.loads(whole.text)
    assert set(pet) == {"kind", "friendly"}
    assert pet["kind"] in ("cat", "dog", "fish")
    before = [e.json for e in whole.events[: n + 1]]
    assert accumulated(before + rest.chunks) == accumulated(whole.chunks)
