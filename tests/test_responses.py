"""OpenAI's Responses API with background mode (issue 17), through the official SDK."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseQueuedEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from tests.prereqs import require
from tests.procs import RedisServer, Stack, start_stack
from tests.test_openai_node import node_client  # noqa: F401 (the fixture, shared)

QUESTION = "tell me about queues"
LONG = "x " * 2400  # ~6 s of synthetic tokens at the tests' rate


@pytest.fixture
def sdk(synthetic: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{synthetic.base_url}/v1", api_key="unused") as client:
        yield client


@pytest.fixture(scope="module")
def replica(synthetic: Stack) -> Iterator[openai.OpenAI]:
    """The SDK on a second API process of the same deployment."""
    _, url = synthetic.add_replica()
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        yield client


@pytest.fixture(scope="module")
def keyed(redis_server: RedisServer) -> Iterator[Stack]:
    """A deployment with two API keys that stops a generation as soon as nobody reads it."""
    stack = start_stack(
        "responses-keyed",
        redis_server.url(11),
        1,
        backend="synthetic",
        synthetic_tokens_per_s="400",
        api_keys="key-one,key-two",
        resume_grace_s="0",
        max_tokens="3000",
    )
    yield stack
    stack.stop()


def wait_done(sdk: openai.OpenAI, resp_id: str) -> Response:
    for _ in range(200):
        response = sdk.responses.retrieve(resp_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.05)
    raise TimeoutError(resp_id)


def test_background_stream_emits_openais_events_in_order(sdk: openai.OpenAI) -> None:
    events = list(
        sdk.responses.create(model="synthetic", input=QUESTION, background=True, stream=True)
    )

    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:6] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    typed = (ResponseCreatedEvent, ResponseQueuedEvent, ResponseInProgressEvent)
    assert all(isinstance(e, t) for e, t in zip(events, typed, strict=False))
    assert isinstance(events[3], ResponseOutputItemAddedEvent)
    assert isinstance(events[4], ResponseContentPartAddedEvent)
    assert isinstance(events[-1], ResponseCompletedEvent)
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text.startswith(f"You asked: {QUESTION}")
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text == text
    assert final.usage is not None
    assert final.usage.output_tokens > 0
    assert sdk.responses.retrieve(final.id).output_text == text


def test_foreground_create_returns_the_completed_response(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(
        model="synthetic",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        instructions="be brief",
        max_output_tokens=4,
        metadata={"ticket": "17"},
    )

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == f"You asked: {QUESTION.rsplit(' ', 2)[0]}"
    assert response.metadata == {"ticket": "17"}
    assert response.instructions == "be brief"
    assert response.usage is not None
    assert response.usage.output_tokens == 4


@pytest.mark.parametrize("cut", [0, 3, 5, 12])
def test_cut_and_resume_on_another_process_reproduces_the_response(
    sdk: openai.OpenAI, replica: openai.OpenAI, cut: int
) -> None:
    stream = sdk.responses.create(
        model="synthetic", input=f"{QUESTION} {cut}", background=True, stream=True
    )
    seen: list[ResponseStreamEvent] = []
    for event in stream:
        seen.append(event)
        if len(seen) > cut:
            break
    stream.close()
    resp_id = seen[0].response.id  # type: ignore[union-attr]

    rest = list(
        replica.responses.retrieve(resp_id, stream=True, starting_after=seen[-1].sequence_number)
    )

    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == wait_done(replica, resp_id).output_text
    assert text.startswith(f"You asked: {QUESTION} {cut}")


def test_replay_of_a_finished_response_is_identical_and_closes(
    sdk: openai.OpenAI, replica: openai.OpenAI
) -> None:
    first = list(
        sdk.responses.create(model="synthetic", input=QUESTION, background=True, stream=True)
    )
    resp_id = first[0].response.id  # type: ignore[union-attr]

    again = list(replica.responses.retrieve(resp_id, stream=True, starting_after=-1))
    tail = list(replica.responses.retrieve(resp_id, stream=True, starting_after=len(first) - 3))

    assert [e.model_dump(exclude={"response"}) for e in again] == [
        e.model_dump(exclude={"response"}) for e in first
    ]
    assert [e.sequence_number for e in tail] == [len(first) - 2, len(first) - 1]


def test_background_create_returns_queued_and_polling_finds_it_completed(
    sdk: openai.OpenAI,
) -> None:
    response = sdk.responses.create(model="synthetic", input=QUESTION, background=True)

    assert response.status == "queued"
    assert response.id.startswith("resp_")
    done = wait_done(sdk, response.id)
    assert done.status == "completed"
    assert done.output_text.startswith(f"You asked: {QUESTION}")


async def test_background_response_runs_with_nobody_reading(keyed: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=f"{keyed.base_url}/v1", api_key="key-one") as sdk:
        # ~6 s of tokens, unread all along, on a deployment that stops unread ones at once...
        response = await sdk.responses.create(model="synthetic", input=LONG, background=True)
        await asyncio.sleep(1)
        done = await sdk.responses.retrieve(response.id)
        while done.status in ("queued", "in_progress"):
            await asyncio.sleep(0.1)
            done = await sdk.responses.retrieve(response.id)

    assert done.status == "completed"  # ...runs to its end
    assert done.output_text.endswith("will never come.")


def test_cancel_stops_a_background_response_and_is_idempotent(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(model="synthetic", input=LONG, background=True)
    wait_started(sdk, response.id)

    cancelled = sdk.responses.cancel(response.id)
    again = sdk.responses.cancel(response.id)

    assert cancelled.status == "cancelled"
    assert again.model_dump() == cancelled.model_dump()
    assert sdk.responses.retrieve(response.id).status == "cancelled"
    events = list(sdk.responses.retrieve(response.id, stream=True))
    assert events[-1].type == "response.failed"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def wait_started(sdk: openai.OpenAI, resp_id: str) -> None:
    for _ in range(200):
        if sdk.responses.retrieve(resp_id).status == "in_progress":
            return
        time.sleep(0.02)
    raise TimeoutError(resp_id)


def test_delete_removes_the_response(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(model="synthetic", input=QUESTION)

    sdk.responses.delete(response.id)

    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)


def test_unknown_ids_get_404_in_openais_shape(sdk: openai.OpenAI) -> None:
    for call in (
        lambda: sdk.responses.retrieve("resp_nope"),
        lambda: sdk.responses.cancel("resp_nope"),
        lambda: sdk.responses.delete("resp_nope"),
    ):
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        assert "resp_nope" in raised.value.message


async def test_another_key_cannot_see_a_response(keyed: Stack) -> None:
    one = openai.AsyncOpenAI(base_url=f"{keyed.base_url}/v1", api_key="key-one")
    two = openai.AsyncOpenAI(base_url=f"{keyed.base_url}/v1", api_key="key-two")
    async with one, two:
        response = await one.responses.create(model="synthetic", input=QUESTION)
        with pytest.raises(openai.NotFoundError):
            await two.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            await two.responses.cancel(response.id)
        with pytest.raises(openai.NotFoundError):
            await two.responses.retrieve(response.id, stream=True)
        with pytest.raises(openai.NotFoundError):
            await two.responses.delete(response.id)
        assert (await one.responses.retrieve(response.id)).status == "completed"


async def test_another_key_cannot_continue_a_response(keyed: Stack) -> None:
    one = openai.AsyncOpenAI(base_url=f"{keyed.base_url}/v1", api_key="key-one")
    two = openai.AsyncOpenAI(base_url=f"{keyed.base_url}/v1", api_key="key-two")
    async with one, two:
        response = await one.responses.create(model="synthetic", input=QUESTION)
        with pytest.raises(openai.NotFoundError) as refused:
            await two.responses.create(
                model="synthetic", input="go on", previous_response_id=response.id
            )
        continued = await one.responses.create(
            model="synthetic", input="go on", previous_response_id=response.id
        )

    assert response.id in refused.value.message
    assert continued.output_text.startswith("You asked: go on")


async def test_async_sdk_background_stream_and_resume(synthetic: Stack) -> None:
    _, url = synthetic.add_replica()
    first = openai.AsyncOpenAI(base_url=f"{synthetic.base_url}/v1", api_key="unused")
    second = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
    async with first, second:
        stream = await first.responses.create(
            model="synthetic", input=QUESTION, background=True, stream=True
        )
        seen = []
        async for event in stream:
            seen.append(event)
            if len(seen) == 8:
                break
        await stream.close()
        resp_id = seen[0].response.id  # type: ignore[union-attr]
        rest = [
            e
            async for e in await second.responses.retrieve(
                resp_id, stream=True, starting_after=seen[-1].sequence_number
            )
        ]
        done = await second.responses.retrieve(resp_id)

    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == done.output_text


def test_previous_response_id_continues_the_conversation(sdk: openai.OpenAI) -> None:
    """The synthetic worker repeats a chat's earlier messages last: the first turn, question and
    answer, reached it with the second's question."""
    first = sdk.responses.create(model="synthetic", input="first question", max_output_tokens=5)

    second = sdk.responses.create(
        model="synthetic", input="second question", previous_response_id=first.id
    )

    assert first.output_text == "You asked: first question\n\nStreaming"
    assert second.previous_response_id == first.id
    assert second.output_text.startswith("You asked: second question")
    assert second.output_text.endswith(
        "Earlier: user: first question | assistant: You asked: first question Streaming"
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True, "store": False}, "store"),
        ({"n": 2}, "n"),  # chat's: a response has one output
        ({"logprobs": True}, "logprobs"),  # chat's: top_logprobs and include ask for them
        ({"include": ["file_search_call.results"]}, "include"),
    ],
)
async def test_unsupported_fields_are_refused_by_name(
    client: httpx.AsyncClient, extra: dict[str, object], param: str
) -> None:
    answer = await client.post("/v1/responses", json={"input": QUESTION, **extra})

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
    assert param in answer.json()["error"]["message"]


async def test_input_parts_other_than_text_are_refused(client: httpx.AsyncClient) -> None:
    content = [{"type": "input_image", "image_url": "https://example.com/a.png"}]
    answer = await client.post(
        "/v1/responses", json={"input": [{"role": "user", "content": content}]}
    )

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "input[0].content[0].type"


def test_a_failed_generation_ends_with_response_failed(sdk: openai.OpenAI) -> None:
    events = list(
        sdk.responses.create(
            model="synthetic", input="boom [[fail after 3]]", background=True, stream=True
        )
    )

    assert events[-1].type == "response.failed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = sdk.responses.retrieve(events[0].response.id)  # type: ignore[union-attr]
    assert failed.status == "failed"
    assert failed.error is not None
    assert "synthetic failure" in failed.error.message


async def test_resuming_past_the_end_closes_at_once(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/responses", json={"input": QUESTION})
    resp_id = created.json()["id"]

    async with asyncio.timeout(5):
        answer = await client.get(
            f"/v1/responses/{resp_id}", params={"stream": "true", "starting_after": 10_000}
        )

    assert answer.status_code == 200
    assert "data:" not in answer.text


async def test_raw_events_name_their_type_and_sequence(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/v1/responses", json={"input": QUESTION, "stream": True, "max_output_tokens": 2}
    )

    blocks = [b for b in answer.text.split("\n\n") if b.strip()]
    assert {"event: response.created", "id: 0"} <= set(blocks[0].splitlines())
    assert "event: response.incomplete" in blocks[-1].splitlines()
    assert "[DONE]" not in answer.text


def test_resume_after_the_creating_process_is_gone(synthetic: Stack, sdk: openai.OpenAI) -> None:
    proc, url = synthetic.add_replica()
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as doomed:
        stream = doomed.responses.create(
            model="synthetic", input=LONG, background=True, stream=True
        )
        seen = list(itertools.islice(stream, 6))
        stream.close()
    proc.stop()

    rest = list(
        sdk.responses.retrieve(
            seen[0].response.id,  # type: ignore[union-attr]
            stream=True,
            starting_after=seen[-1].sequence_number,
        )
    )

    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"  # ran to the cap of 1024 tokens
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == sdk.responses.retrieve(seen[0].response.id).output_text  # type: ignore[union-attr]


def test_the_sdks_stream_helper_resumes(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(model="synthetic", input=QUESTION, background=True)

    with sdk.responses.stream(response_id=created.id, starting_after=-1) as stream:
        deltas = [e.delta for e in stream if isinstance(e, ResponseTextDeltaEvent)]
        final = stream.get_final_response()

    assert "".join(deltas) == final.output_text
    assert final.output_text.startswith(f"You asked: {QUESTION}")


def test_the_npm_client_creates_cuts_and_resumes(
    node_client: Path,  # noqa: F811 (the fixture imported above)
    synthetic: Stack,
) -> None:
    done = subprocess.run(
        ["node", str(node_client.with_name("responses_client.mjs"))],
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "SLUICE_BASE_URL": f"{synthetic.base_url}/v1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(done.stdout)

    assert seen["sequence"] == list(range(len(seen["sequence"])))
    assert seen["last"] == "response.completed"
    assert seen["stored"]["status"] == "completed"
    assert seen["text"] == seen["stored"]["output_text"]
    assert seen["text"].startswith("You asked: hello from node")


def readme_examples() -> list[str]:
    """README's `sh` blocks about this API (`bash` ones are run by tests/test_readme.py, which
    expects Chat Completions' `[DONE]`)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return [code for code in FENCE.findall(text) if "/v1/responses" in code]


FENCE = re.compile(r"^```sh\n(.*?)^```$", re.S | re.M)


@pytest.mark.parametrize("code", readme_examples() or [None])
def test_readme_curl_example_runs(synthetic: Stack, code: str | None, tmp_path: Path) -> None:
    if code is None:
        pytest.skip("README has no `sh` example of /v1/responses yet")
    require("curl")
    code = code.replace("http://localhost:8080", synthetic.base_url)

    done = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )

    assert done.returncode == 0, done.stderr
    assert "event: response.completed" in done.stdout
    assert '"status":"completed"' in done.stdout.replace(" ", "")
