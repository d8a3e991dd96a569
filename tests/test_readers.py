"""The reader registry tells Redis which streams this process reads: whatever order readers
come and go in, once its marks are said, each stream read here is marked read now and each no
longer read is marked for the supervisor's next tick; and marks that come together share a
call. Against a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from api.readers import ReaderRegistry
from shared.protocol import READERS_KEY, worker_ttl_ms
from tests.procs import RedisServer

DB = 15
PERIOD_S = 60.0  # no periodic refresh during a test: only the marks said at once count
KEEP_S = 600.0
STREAMS = 4

Open = st.tuples(st.just("open"), st.integers(0, STREAMS - 1))
Close = st.tuples(st.just("close"), st.integers(0, 1000))
Turn = st.tuples(st.just("turn"), st.just(0))  # lets the registry's call go out meanwhile


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[tuple[Redis, ReaderRegistry]]:
    redis = Redis.from_url(redis_server.fresh_url(DB))
    yield redis, ReaderRegistry(redis, PERIOD_S, KEEP_S)
    await redis.aclose()


class CountingRefresh:
    """The registry's refresh script, counting its calls."""

    def __init__(self, registry: ReaderRegistry) -> None:
        self.calls = 0
        self._script = registry._refresh
        registry._refresh = self  # type: ignore[assignment]

    async def __call__(self, **kwargs: object) -> object:
        self.calls += 1
        return await self._script(**kwargs)


@settings(max_examples=60, deadline=None, database=None)
@given(ops=st.lists(st.one_of(Open, Close, Turn), max_size=40))
async def test_once_said_each_stream_is_marked_as_it_stands(
    redis_server: RedisServer, ops: list[tuple[str, int]]
) -> None:
    redis = Redis.from_url(redis_server.fresh_url(DB))
    registry = ReaderRegistry(redis, PERIOD_S, KEEP_S)
    streams = [f"readers-{uuid.uuid4().hex[:8]}-{n}" for n in range(STREAMS)]
    opened: set[str] = set()
    with ExitStack() as readers:
        open_readers: list[tuple[str, ExitStack]] = []
        for op, n in ops:
            if op == "open":
                reader = ExitStack()
                reader.enter_context(registry.reading(streams[n]))
                open_readers.append((streams[n], reader))
                opened.add(streams[n])
            elif op == "close" and open_readers:
                _, reader = open_readers.pop(n % len(open_readers))
                reader.close()
            else:
                await asyncio.sleep(0)
        await registry.said()
        seconds, microseconds = await redis.time()
        now_ms = seconds * 1000 + microseconds // 1000
        scores = dict(await redis.zrange(READERS_KEY, 0, -1, withscores=True))
        still_read = {stream for stream, _ in open_readers}
        for stream in opened:
            score = scores.get(stream.encode())
            if stream in still_read:
                assert score is not None, f"{stream} read, not marked"
                assert score >= now_ms - 1000, f"{stream} read, marked long ago"
            else:
                assert score is None or score < now_ms - worker_ttl_ms(PERIOD_S), (
                    f"{stream} no longer read, still marked read"
                )
        for _, reader in open_readers:
            readers.push(reader)
    await registry.said()
    await redis.aclose()


async def test_readers_that_come_and_go_together_share_a_call(
    registry: tuple[Redis, ReaderRegistry],
) -> None:
    """A hundred streams starting and ending at once (one loop turn each) are two calls, not two
    hundred: one mark per stream cost the API a round trip per request (issue 26)."""
    _, readers = registry
    counting = CountingRefresh(readers)
    streams = [f"together-{uuid.uuid4().hex[:8]}-{n}" for n in range(100)]
    with ExitStack() as stack:
        for stream in streams:
            stack.enter_context(readers.reading(stream))
        await readers.said()
    await readers.said()
    assert counting.calls <= 2 + 1, f"{counting.calls} calls for 100 streams"


async def test_a_stream_whose_end_was_relayed_here_is_left_for_the_next_refresh(
    registry: tuple[Redis, ReaderRegistry],
) -> None:
    """Its generation is over: the supervisor has nothing to stop, so its last reader's leaving
    costs no call of its own (one per request in bursts, issue 26). One left before its end is
    said at once."""
    redis, readers = registry
    counting = CountingRefresh(readers)
    ended, cut = (f"left-{uuid.uuid4().hex[:8]}-{n}" for n in range(2))
    for stream in (ended, cut):
        with readers.reading(stream):
            await readers.said()
            if stream == ended:
                readers.ended(stream)
        await readers.said()
    assert counting.calls == 3  # both marked read; only `cut` marked left at once

    async def unread_by() -> float:
        """A member scored below this is one the supervisor finds unread now."""
        seconds, microseconds = await redis.time()
        return seconds * 1000 + microseconds // 1000 - worker_ttl_ms(PERIOD_S)

    assert (await redis.zscore(READERS_KEY, cut) or 0) < await unread_by()
    assert (await redis.zscore(READERS_KEY, ended) or 0) > await unread_by()

    await readers.refresh()
    assert (await redis.zscore(READERS_KEY, ended) or 0) < await unread_by() + 1
