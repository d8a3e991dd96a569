"""The worker's stream writer, against a real Redis: order, batching and catching up."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from shared.protocol import Entry, Finished, Started, decode, from_fields, stream_key
from worker.writer import StreamWriter


@pytest.fixture
def key() -> str:
    return stream_key(f"writer-test-{uuid.uuid4().hex}")


async def entries(redis: Redis, key: str) -> list[Entry]:
    return [from_fields(fields) for _, fields in await redis.xrange(key)]


async def test_text_sent_before_the_stream_is_written_joins_its_unwritten_token(
    redis: Redis, key: str
) -> None:
    writer = StreamWriter(redis, maxlen=1000)
    await writer.append(key, Started("w", 1))
    for piece in ("a", "b", "c"):  # no await in between lets the writer run: all unwritten
        await writer.send(key, piece)
    await writer.append(key, Finished("stop", 1, 3))

    assert [type(e).__name__ for e in await entries(redis, key)] == ["Started", "Token", "Finished"]
    assert (await entries(redis, key))[1] == decode(b"t", b"abc")
    await redis.delete(key)


async def test_text_never_joins_across_another_entry_or_stream(redis: Redis, key: str) -> None:
    other = key + "-other"
    writer = StreamWriter(redis, maxlen=1000)
    await writer.send(key, "a")
    await writer.send(other, "x")
    await writer.send(key, "b")
    written = writer.append(key, Started("w", 1))  # in order from here, not yet awaited
    await writer.send(key, "c")
    await written
    await writer.append(other, Finished("stop", 1, 1))

    mine = await entries(redis, key)
    assert [getattr(e, "text", type(e).__name__) for e in mine] == ["ab", "Started", "c"]
    assert [getattr(e, "text", None) for e in await entries(redis, other)] == ["x", None]
    await redis.delete(key, other)


async def test_a_writer_that_keeps_up_writes_one_entry_per_token(redis: Redis, key: str) -> None:
    writer = StreamWriter(redis, maxlen=1000)
    for piece in ("a", "b", "c"):
        await writer.send(key, piece)
        await writer.append(key + "-sync", Started("w", 0))  # wait until written
    assert [getattr(e, "text", None) for e in await entries(redis, key)] == ["a", "b", "c"]
    await redis.delete(key, key + "-sync")
