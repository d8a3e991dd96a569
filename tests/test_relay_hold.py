"""A relay that is behind waits and sends what piled up as one batch; one that keeps up sends
every entry as it comes, and one replaying history does not wait. The hub and the relay run
here against a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis

from api.hub import StreamHub
from api.relay import Batch, Waiting, follow
from shared.protocol import Entry, Finished, Started, Token, as_fields, stream_key
from shared.settings import Settings
from tests.hubs import running_hub

HOLD_S = 0.3
SETTINGS = Settings(backend="synthetic", behind_s=0.05, max_hold_s=HOLD_S)


PAGE = 4  # entries one read returns per stream, small so that history takes pages


@pytest.fixture
async def hub(redis: ArqRedis) -> AsyncIterator[StreamHub]:
    async with running_hub(redis, count=PAGE) as (hub, _):
        yield hub


@pytest.fixture
async def stream_id(redis: ArqRedis) -> AsyncIterator[str]:
    """A fresh stream's id; the stream is deleted after the test."""
    stream_id = f"relay-test-{uuid.uuid4().hex}"
    yield stream_id
    await redis.delete(stream_key(stream_id))


async def append(redis: ArqRedis, stream_id: str, entry: Entry, entry_id: str = "") -> None:
    """As the fenced append writes it: the n-th entry is `<ms>-<n>` (`entry_id` if given)."""
    key = stream_key(stream_id)
    if not entry_id:
        last = await redis.xrevrange(key, count=1)
        last_ms = int(last[0][0].decode().partition("-")[0]) if last else 0
        ms = max(int(time.time() * 1000), last_ms)
        entry_id = f"{ms}-{await redis.xlen(key) + 1}"
    await redis.xadd(key, as_fields(entry), id=entry_id)


async def batches(
    hub: StreamHub, redis: ArqRedis, stream_id: str, after: str = "0-0"
) -> AsyncIterator[tuple[float, Batch]]:
    async for item in follow(hub, SETTINGS, stream_id, after):
        if not isinstance(item, Waiting):
            yield time.perf_counter(), item


def texts(batch: Batch) -> list[str]:
    return [entry.text for _, entry in batch if isinstance(entry, Token)]


async def test_a_relay_behind_holds_then_sends_the_backlog_at_once(
    hub: StreamHub, redis: ArqRedis, stream_id: str
) -> None:
    written_long_ago = int(time.time() * 1000) - 2000  # Redis ids are milliseconds
    await append(redis, stream_id, Started("w", 1), f"{written_long_ago}-1")
    await append(redis, stream_id, Token("a"), f"{written_long_ago}-2")

    relay = batches(hub, redis, stream_id)
    _, first = await anext(relay)
    for text in ("b", "c"):  # written while the relay holds
        await append(redis, stream_id, Token(text))
    held_from = time.perf_counter()
    at, second = await anext(relay)

    assert texts(first) == ["a"]
    assert texts(second) == ["b", "c"]
    assert at - held_from >= HOLD_S * 0.9


async def test_a_relay_that_keeps_up_sends_each_entry_as_it_comes(
    hub: StreamHub, redis: ArqRedis, stream_id: str
) -> None:
    await append(redis, stream_id, Started("w", 1))
    relay = batches(hub, redis, stream_id)
    await anext(relay)

    seen = []
    for text in ("a", "b", "c"):
        await append(redis, stream_id, Token(text))
        _, batch = await asyncio.wait_for(anext(relay), HOLD_S / 2)
        seen.append(texts(batch))

    assert seen == [["a"], ["b"], ["c"]]


async def test_a_resumed_relay_replays_history_page_after_page_without_waiting(
    hub: StreamHub, redis: ArqRedis, stream_id: str
) -> None:
    long_ago = int(time.time() * 1000) - 60_000
    entries = [Started("w", 1), *(Token(str(n)) for n in range(2 * PAGE)), Finished("stop", 1, 8)]
    for seq, entry in enumerate(entries, start=1):
        await append(redis, stream_id, entry, f"{long_ago}-{seq}")

    started = time.perf_counter()
    pages = [batch async for _, batch in batches(hub, redis, stream_id, f"{long_ago}-1")]

    assert [len(page) for page in pages] == [PAGE, PAGE, 1]
    assert time.perf_counter() - started < HOLD_S
