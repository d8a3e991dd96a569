"""The worker's stream writer, against a real Redis: order, batching and catching up."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from shared.protocol import Attempt, Entry, Finished, Started, decode, from_fields, job_id
from worker.writer import (
    LOADED_SENDS_PER_S,
    LOADED_STREAMS,
    LOADED_WRITE_INTERVAL_S,
    MAX_ENTRIES_PER_CALL,
    MIN_WRITE_INTERVAL_S,
    StreamWriter,
)

NewAttempt = Callable[[], Awaitable[Attempt]]


@pytest.fixture
async def new_attempt(redis: Redis) -> AsyncIterator[NewAttempt]:
    """Makes streams whose current attempt is the one returned, as a submit leaves them."""
    made: list[Attempt] = []

    async def make() -> Attempt:
        stream_id = f"writer-test-{uuid.uuid4().hex}"
        attempt = Attempt(stream_id, job_id(stream_id, 1))
        await redis.hset(attempt.meta_key, "job", attempt.job)  # type: ignore[misc]
        made.append(attempt)
        return attempt

    yield make
    for attempt in made:
        await redis.delete(attempt.stream_key, attempt.meta_key)


@pytest.fixture
async def key(new_attempt: NewAttempt) -> Attempt:
    return await new_attempt()


async def entries(redis: Redis, key: Attempt) -> list[Entry]:
    return [from_fields(fields) for _, fields in await redis.xrange(key.stream_key)]


async def test_text_sent_before_the_stream_is_written_joins_its_unwritten_token(
    redis: Redis, key: Attempt
) -> None:
    writer = StreamWriter(redis)
    await writer.append(key, Started("w", 1))
    for piece in ("a", "b", "c"):  # no await in between lets the writer run: all unwritten
        await writer.send(key, piece)
    await writer.append(key, Finished("stop", 1, 3))

    assert [type(e).__name__ for e in await entries(redis, key)] == ["Started", "Token", "Finished"]
    assert (await entries(redis, key))[1] == decode(b"t", b"abc")


async def test_text_never_joins_across_another_entry_or_stream(
    redis: Redis, key: Attempt, new_attempt: NewAttempt
) -> None:
    other = await new_attempt()
    writer = StreamWriter(redis)
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


async def test_a_writer_that_keeps_up_writes_one_entry_per_token(
    redis: Redis, key: Attempt, new_attempt: NewAttempt
) -> None:
    writer = StreamWriter(redis)
    sync = await new_attempt()
    for piece in ("a", "b", "c"):
        await writer.send(key, piece)
        await writer.append(sync, Started("w", 0))  # wait until written
    assert [getattr(e, "text", None) for e in await entries(redis, key)] == ["a", "b", "c"]


async def test_flushed_returns_once_everything_sent_is_in_the_stream(
    redis: Redis, key: Attempt
) -> None:
    writer = StreamWriter(redis)
    await writer.append(key, Started("w", 1))
    await writer.send(key, "sent, not awaited")

    await writer.flushed()

    assert (await entries(redis, key))[1:] == [decode(b"t", b"sent, not awaited")]
    await writer.flushed()  # nothing pending: returns at once


async def paced_tokens(
    writer: StreamWriter, streams: list[Attempt], tokens: int, every_s: float
) -> None:
    """`tokens` tokens to each of `streams`, a round of one token each every `every_s`."""
    for n in range(tokens):
        for attempt in streams:
            await writer.send(attempt, f"{n} ")
        await asyncio.sleep(every_s)
    await writer.flushed()


@pytest.mark.parametrize(
    ("streams", "every_s", "loaded_interval_s", "sends_per_s", "several_per_entry"),
    [
        (10, 0.01, LOADED_WRITE_INTERVAL_S, LOADED_SENDS_PER_S, False),
        (LOADED_STREAMS + 50, 0.025, LOADED_WRITE_INTERVAL_S, LOADED_SENDS_PER_S, False),
        (LOADED_STREAMS + 250, 0.01, LOADED_WRITE_INTERVAL_S, LOADED_SENDS_PER_S // 2, True),
        (LOADED_STREAMS + 50, 0.01, 0, LOADED_SENDS_PER_S, False),
    ],
    ids=["few-streams", "many-slow-streams", "loaded", "loaded-interval-off"],
)
async def test_a_loaded_writer_puts_several_tokens_in_an_entry_and_an_unloaded_one_does_not(
    redis: Redis,
    new_attempt: NewAttempt,
    streams: int,
    every_s: float,
    loaded_interval_s: float,
    sends_per_s: int,
    several_per_entry: bool,
) -> None:
    """A round of tokens every 10 ms to 10 streams, or every 25 ms to 150 (6,000 tokens a
    second): every token is its own entry. Every 10 ms to 350 streams (35,000 a second): once
    the writer has judged its load, a stream's entries each carry the tokens of its longer
    interval, unless that is turned off (SLUICE_LOADED_WRITE_INTERVAL_S=0). That case's
    threshold is halved (5,000 a second): under coverage, in the whole suite, the test's loop
    shares its thread with the writer's own work and once sent under 10,000 a second for an
    interval, and the writer rightly wrote single tokens until its load came back."""
    attempts = [await new_attempt() for _ in range(streams)]
    writer = StreamWriter(
        redis, loaded_interval_s=loaded_interval_s, loaded_sends_per_s=sends_per_s
    )

    await paced_tokens(writer, attempts, 40, every_s)

    per_entry = [len(e.text.split()) for e in await entries(redis, attempts[0])]
    assert sum(per_entry) == 40
    if several_per_entry:  # once it has judged itself loaded (within its longer interval)
        judged = next(n for n in range(len(per_entry)) if sum(per_entry[:n]) >= 15)
        assert statistics.median(per_entry[judged:]) >= 4, per_entry
    else:
        assert statistics.median(per_entry) == 1  # two join only when a write lags


async def test_many_streams_each_sending_now_and_then_load_the_writer(
    redis: Redis, new_attempt: NewAttempt
) -> None:
    """The writer judges its load over its longer interval, not between two writes: scaled
    down here (loaded from 20 streams and 1,000 tokens a second), 40 streams in four groups, a
    group every 2 ms, each stream a token every 8 ms: 5,000 tokens a second, but only 10
    streams between two writes 2 ms apart. It is loaded: a stream's entries carry several
    tokens. (Judged between writes, it never was, unless a slow write happened to let enough
    streams send: at a thousand streams of 30 tokens/s, some 60 of the 100 it took, and the
    1000-stream bench swung between two speeds.)"""
    attempts = [await new_attempt() for _ in range(40)]
    groups = [attempts[g::4] for g in range(4)]
    writer = StreamWriter(redis, loaded_sends_per_s=1_000, loaded_streams=20)
    for n in range(40):
        for group in groups:
            for attempt in group:
                await writer.send(attempt, f"{n} ")
            await asyncio.sleep(0.002)
    await writer.flushed()

    per_entry = [len(e.text.split()) for e in await entries(redis, attempts[0])]
    judged = next(n for n in range(len(per_entry)) if sum(per_entry[:n]) >= 15)
    assert statistics.median(per_entry[judged:]) >= 3, per_entry


async def written_to(redis: Redis, attempt: Attempt, length: int) -> None:
    """Returns as soon as the attempt's stream holds more than `length` entries."""
    for _ in range(5000):
        if await redis.xlen(attempt.stream_key) > length:
            return
        await asyncio.sleep(0.001)
    raise TimeoutError(attempt.stream_key)


async def test_a_loaded_writer_does_not_hold_a_streams_first_text(
    redis: Redis, new_attempt: NewAttempt
) -> None:
    """While the writer is loaded (150 streams, a token each every 10 ms), a stream begun
    meanwhile has its first text written after the short interval, not the loaded one's."""
    attempts = [await new_attempt() for _ in range(LOADED_STREAMS + 50)]
    writer = StreamWriter(redis)
    loading = asyncio.create_task(paced_tokens(writer, attempts, 60, 0.01))
    await asyncio.sleep(0.3)  # loaded by now: its writes come every 100 ms
    await written_to(redis, attempts[0], await redis.xlen(attempts[0].stream_key))  # just now
    newcomer = await new_attempt()
    writer.begin(newcomer, 0, "run")

    sent = time.monotonic()
    await writer.send(newcomer, "first")
    await written_to(redis, newcomer, 0)
    waited = time.monotonic() - sent
    await loading

    assert waited < LOADED_WRITE_INTERVAL_S / 2


async def test_a_loaded_writer_keeps_its_interval_for_other_streams_while_streams_start(
    redis: Redis, new_attempt: NewAttempt
) -> None:
    """While the writer is loaded and a stream starts every 5 ms (thirty in all), each
    newcomer's first text goes out at once, alone: the loaded streams' entries still carry the
    tokens of the longer interval, not one or two (as when each first text wrote everything)."""
    attempts = [await new_attempt() for _ in range(LOADED_STREAMS + 50)]
    writer = StreamWriter(redis)
    loading = asyncio.create_task(paced_tokens(writer, attempts, 60, 0.01))
    await asyncio.sleep(0.3)  # loaded by now
    before = await redis.xlen(attempts[0].stream_key)
    for _ in range(30):
        newcomer = await new_attempt()
        writer.begin(newcomer, 0, "run")
        await writer.send(newcomer, "first")
        await asyncio.sleep(0.005)
    await loading

    per_entry = [len(e.text.split()) for e in (await entries(redis, attempts[0]))[before:]]
    assert statistics.median(per_entry) >= 4, per_entry


async def test_a_large_batch_is_written_in_parts_each_entry_once_in_order(
    redis: Redis, new_attempt: NewAttempt
) -> None:
    """A script call holds Redis while it runs: 300 entries go in calls of at most
    MAX_ENTRIES_PER_CALL, and every stream still gets its entries once, in order."""
    attempts = [await new_attempt() for _ in range(150)]
    writer = StreamWriter(redis)
    script = writer._append
    calls: list[int] = []

    async def counted(*, keys: list[str], args: list[str | int]) -> list[bytes]:
        calls.append(len(keys) // 2)
        ids: list[bytes] = await script(keys=keys, args=args)
        return ids

    writer._append = counted  # type: ignore[assignment]
    for attempt in attempts:
        writer.append(attempt, Started("w", 1))
    for attempt in attempts:
        await writer.send(attempt, "text")
    await writer.flushed()

    assert sum(calls) == 300
    assert max(calls) <= MAX_ENTRIES_PER_CALL
    for attempt in attempts:
        assert [type(e).__name__ for e in await entries(redis, attempt)] == ["Started", "Token"]


async def test_a_streams_first_text_is_not_held_behind_another_streams_write(
    redis: Redis, new_attempt: NewAttempt
) -> None:
    """An unloaded writer spaces its writes by `MIN_WRITE_INTERVAL_S`, so that tokens share
    them; a stream's first text goes out once the write on its way is back. Streams started
    together have their first tokens a fraction of a millisecond apart: held, each but the first
    waited for most of the interval."""
    waits: list[float] = []
    for _ in range(10):
        first, second = await new_attempt(), await new_attempt()
        writer = StreamWriter(redis)
        writer.begin(first, 0, "run")
        writer.begin(second, 0, "run")
        await writer.send(first, "first")
        await asyncio.sleep(0.0005)  # the first stream's write is on its way, or back
        sent = time.monotonic()
        await writer.send(second, "second")
        await writer.flushed()
        waits.append(time.monotonic() - sent)

    assert statistics.median(waits) < MIN_WRITE_INTERVAL_S / 2, waits
