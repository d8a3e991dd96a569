"""Continuous batching on the real model (issue 14): one worker decodes its streams together."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import llama_cpp
import pytest

from shared.schema import GenerationJob
from shared.settings import Settings
from tests.procs import RedisServer, Stack, start_stack
from worker.backends.llama import LlamaBackend

pytestmark = pytest.mark.model

SEQUENCES = 4
TOPICS = {
    "cats": r"\bcats?\b",
    "the ocean": r"\bocean",
    "volcanoes": r"\bvolcano",
    "bicycles": r"\bbicycle",
}


@pytest.fixture(scope="module")
def batched(redis_server: RedisServer) -> Iterator[Stack]:
    """API + one llama worker decoding up to four streams together."""
    stack = start_stack(
        "batching", redis_server.url(14), 1, backend="llama", worker_max_jobs=str(SEQUENCES)
    )
    yield stack
    stack.stop()


@pytest.fixture
async def api(batched: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=batched.base_url, timeout=120) as client:
        yield client


@dataclass
class Reading:
    """One stream as its client saw it, with when each piece of content arrived."""

    stream_id: str = ""
    text: str = ""
    arrivals: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    ended: float = 0.0


def chat(content: str, **options: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "stream": True, **options}


async def read(
    api: httpx.AsyncClient,
    body: dict[str, Any],
    on_content: Callable[[Reading], Awaitable[None]] | None = None,
) -> Reading:
    reading = Reading()
    async with api.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        reading.stream_id = response.headers["x-sluice-stream-id"]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                reading.errors.append(chunk["error"])
                continue
            choice = chunk["choices"][0]
            reading.finish_reason = choice.get("finish_reason") or reading.finish_reason
            if content := choice["delta"].get("content"):
                reading.text += content
                reading.arrivals.append(time.monotonic())
                if on_content is not None:
                    await on_content(reading)
    reading.ended = time.monotonic()
    return reading


async def test_concurrent_streams_each_complete_and_stay_on_their_own_topic(
    api: httpx.AsyncClient,
) -> None:
    topics = list(TOPICS)
    bodies = [chat(f"Write two sentences about {t}.", max_tokens=48, temperature=0) for t in topics]

    readings = await asyncio.gather(*(read(api, body) for body in bodies))

    for topic, reading in zip(topics, readings, strict=True):
        assert not reading.errors
        assert reading.finish_reason in ("stop", "length")
        assert re.search(TOPICS[topic], reading.text, re.I), (topic, reading.text)
        others = [pattern for other, pattern in TOPICS.items() if other != topic]
        assert not any(re.search(p, reading.text, re.I) for p in others), (topic, reading.text)


async def test_a_cancel_in_the_middle_of_a_batch_stops_only_that_stream(
    api: httpx.AsyncClient,
) -> None:
    long = {"max_tokens": 64, "min_tokens": 64, "temperature": 0}

    async def cancel_after_a_few(reading: Reading) -> None:
        if len(reading.arrivals) == 4:
            response = await api.post(f"/v1/streams/{reading.stream_id}/cancel")
            assert response.status_code == 200

    cancelled, *others = await asyncio.gather(
        read(api, chat("Write an essay about cats.", **long), cancel_after_a_few),
        read(api, chat("Write an essay about the ocean.", **long)),
        read(api, chat("Write an essay about volcanoes.", **long)),
    )

    assert cancelled.errors[-1]["code"] == "cancelled"
    assert len(cancelled.arrivals) < 20  # stopped within a token or two of the cancel
    for reading in others:
        assert not reading.errors
        assert reading.finish_reason == "length"
        assert reading.ended > cancelled.ended


async def test_a_stream_that_arrives_while_others_generate_gets_its_first_token_before_they_end(
    api: httpx.AsyncClient,
) -> None:
    long = {"max_tokens": 160, "min_tokens": 160, "temperature": 0}
    generating = asyncio.Event()

    async def note_progress(reading: Reading) -> None:
        if len(reading.arrivals) >= 8:
            generating.set()

    running = [
        asyncio.create_task(read(api, chat(f"Write an essay about {t}.", **long), note_progress))
        for t in ("cats", "the ocean", "volcanoes")
    ]
    await asyncio.wait_for(generating.wait(), 60)

    late = await read(api, chat("Name a colour.", max_tokens=8, temperature=0))
    readings = await asyncio.gather(*running)

    assert late.arrivals
    assert not late.errors
    first_end = min(r.ended for r in readings)
    assert late.arrivals[0] < first_end
    assert late.ended < first_end  # it joined the running batch instead of waiting for it
    assert all(r.finish_reason == "length" and not r.errors for r in readings)


async def test_same_seed_and_prompt_give_the_same_text_alone(api: httpx.AsyncClient) -> None:
    body = chat("Name three colours.", max_tokens=30, temperature=0.9, seed=1234)
    other = chat("Name three animals.", max_tokens=30, temperature=0.9)

    first = await read(api, body)
    await read(api, other)  # the slot's cache now holds something else
    second = await read(api, body)

    assert first.text
    assert first.text == second.text


async def test_a_sequence_that_leaves_early_frees_its_kv_cells_at_once() -> None:
    backend = LlamaBackend(Settings(backend="llama", worker_max_jobs=2, n_ctx=512))

    def job(topic: str) -> GenerationJob:
        return GenerationJob(
            stream_id=topic,
            messages=[{"role": "user", "content": f"Write an essay about {topic}."}],
            max_tokens=48,
            min_tokens=48,
            temperature=0,
            top_p=1,
        )

    try:
        stays, leaves = await backend.start(job("cats")), await backend.start(job("the ocean"))
        async with aclosing(stays.pieces) as staying, aclosing(leaves.pieces) as leaving:
            for _ in range(3):
                await anext(staying)
                await anext(leaving)
            await leaving.aclose()  # what worker/generate.py does on a cancel or a stop string
            kept = [piece async for piece in staying]
        # The decode thread is idle now. Had the sequence not left, it would have ended on its
        # own (min_tokens = max_tokens) and kept its cells as its slot's prompt cache.
        memory = llama_cpp.llama_get_memory(backend._ctx)
        last_positions = sorted(llama_cpp.llama_memory_seq_pos_max(memory, s) for s in (0, 1))
    finally:
        backend.close()

    assert len(kept) == 48 - 3
    assert last_positions[0] == -1  # the one that left: no cells at all
    assert last_positions[1] > 48  # the one that finished: its prompt and answer, as a cache
