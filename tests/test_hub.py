"""The hub hands each reader every entry after the reader's own id, in order, once, whatever
other readers of the same streams on the same process do. Readers join at any id (a client
resuming here while its old connection still reads), give up a read and make it again (as the
relay does each tick), and leave, while a writer appends and rings the bells as sluice's
scripts do; against a real Redis. The hub is run both ways it reads: asking for every stream
waited for, and (as with many streams) only for those the bells named."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import Phase, example, given, note, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from api.hub import MIN_CALL_INTERVAL_S, READ_ALL_UP_TO, StreamHub
from shared.protocol import BELLS_KEY
from tests.hubs import running_hub
from tests.procs import RedisServer

STREAMS = 2
PAGE = 3  # entries one read returns per stream: small, so that replies are cut short too
BLOCK_MS = 30_000  # no wait here is this long: a reader must never wait out a blocked call
CATCH_UP_S = 2.0
SETTLE_S = 0.005  # once the readers have caught up, time for the hub to block in its next call


@dataclass(frozen=True)
class Write:
    stream: int
    count: int


@dataclass(frozen=True)
class Join:
    stream: int
    cursor: int
    """Which entry the reader has: 0 none, n the n-th written (modulo those written so far)."""
    tick_ms: int | None
    """How long each read waits before the reader gives it up and makes it again. Well over the
    hub's MIN_CALL_INTERVAL_S: a reader that always gives up before the hub's next call could
    starve (the relay's tick is a second)."""


@dataclass(frozen=True)
class Leave:
    reader: int
    """Which of the readers still reading (modulo their number)."""


Op = Write | Join | Leave

steps = st.lists(
    st.tuples(
        st.one_of(
            st.builds(Write, st.integers(0, STREAMS - 1), st.integers(1, 2 * PAGE + 1)),
            st.builds(
                Join,
                st.integers(0, STREAMS - 1),
                st.integers(0, 1000),
                st.sampled_from([None, None, 10, 50]),
            ),
            st.builds(Leave, st.integers(0, 1000)),
        ),
        st.booleans(),  # whether the readers catch up and the hub blocks again before the next
    ),
    min_size=1,
    max_size=30,
)


@dataclass(eq=False)
class Reader:
    key: str
    after: str
    tick_s: float | None
    progress: asyncio.Event = field(repr=False)
    got: list[str] = field(default_factory=list)

    @property
    def last(self) -> str:
        return self.got[-1] if self.got else self.after

    async def run(self, hub: StreamHub) -> None:
        while True:
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that comes as the read
            # completes, and the reader would never stop.
            try:
                async with asyncio.timeout(self.tick_s):
                    entries = await hub.read(self.key, self.last)
            except TimeoutError:
                continue
            self.got.extend(entry_id.decode() for entry_id, _ in entries)
            self.progress.set()


class Scenario:
    def __init__(self, redis: Redis, hub: StreamHub) -> None:
        self.redis = redis
        self.hub = hub
        self.keys = [f"test-hub:{uuid.uuid4().hex}:{n}" for n in range(STREAMS)]
        self.written: dict[str, list[str]] = {key: [] for key in self.keys}
        self.reading: dict[Reader, asyncio.Task[None]] = {}
        self.left: list[Reader] = []
        self.progress = asyncio.Event()

    async def play(self, op: Op) -> None:
        match op:
            case Write(stream, count):
                key = self.keys[stream]
                # As an append script does: the entries and their bell at once.
                async with self.redis.pipeline(transaction=True) as pipe:
                    for n in range(count):
                        pipe.xadd(key, {"n": n})
                    pipe.xadd(BELLS_KEY, {"k": key})
                    ids: list[bytes] = (await pipe.execute())[:-1]
                self.written[key].extend(entry_id.decode() for entry_id in ids)
            case Join(stream, cursor, tick_ms):
                key = self.keys[stream]
                have = ["0-0", *self.written[key]]
                tick_s = None if tick_ms is None else tick_ms / 1000
                reader = Reader(key, have[cursor % len(have)], tick_s, self.progress)
                self.reading[reader] = asyncio.create_task(reader.run(self.hub))
            case Leave(n) if self.reading:
                reader = list(self.reading)[n % len(self.reading)]
                await self._stop(reader)
                self.left.append(reader)

    def behind(self) -> list[Reader]:
        return [r for r in self.reading if r.last != (self.written[r.key] or ["0-0"])[-1]]

    async def catch_up(self) -> None:
        """Until every reader has the last entry written to its stream."""
        try:
            async with asyncio.timeout(CATCH_UP_S):
                while self.behind():
                    self.progress.clear()
                    await self.progress.wait()
        except TimeoutError:
            stuck = [(r.after, r.got, self.written[r.key]) for r in self.behind()]
            raise AssertionError(f"readers stuck (after, got, written): {stuck}") from None

    def expected(self, reader: Reader) -> list[str]:
        """Every entry of the reader's stream after its id."""
        ids = self.written[reader.key]
        return ids[ids.index(reader.after) + 1 :] if reader.after in ids else ids

    async def close(self) -> None:
        for reader in list(self.reading):
            await self._stop(reader)
        await self.redis.delete(*self.keys)

    async def _stop(self, reader: Reader) -> None:
        task = self.reading.pop(reader)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# No shrinking: a reader stuck behind a blocked call costs CATCH_UP_S per replay, and shrinking
# would replay such an example for minutes before reporting it.
@settings(
    max_examples=100,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(steps=steps)
@example(
    steps=[
        (Join(stream=0, cursor=0, tick_ms=None), True),
        (Write(stream=0, count=1), True),
        (Write(stream=0, count=1), True),
    ]
)
@example(  # issue 12: a client resumes here while its old connection, at the head, still reads
    steps=[
        (Write(stream=0, count=4), True),
        (Join(stream=0, cursor=4, tick_ms=None), True),
        (Join(stream=0, cursor=1, tick_ms=None), False),
        (Write(stream=0, count=2), True),
    ]
)
@example(  # a reader that came while the hub looked up the bells' position, at its start
    steps=[
        (Join(stream=0, cursor=0, tick_ms=50), False),
        (Join(stream=0, cursor=0, tick_ms=50), False),
        (Write(stream=1, count=2), False),
        (Join(stream=1, cursor=1, tick_ms=None), True),
    ]
)
@pytest.mark.parametrize("read_all_up_to", [READ_ALL_UP_TO, 0])
async def test_every_reader_gets_each_entry_after_its_id_once_in_order(
    redis_server: RedisServer, steps: list[tuple[Op, bool]], read_all_up_to: int
) -> None:
    note(f"steps: {steps}")
    # Closed however the test ends: a connection left open fails a later test at its collection.
    async with (
        Redis.from_url(redis_server.url()) as redis,
        running_hub(redis, count=PAGE, block_ms=BLOCK_MS, read_all_up_to=read_all_up_to) as (
            hub,
            _,
        ),
    ):
        scenario = Scenario(redis, hub)
        try:
            for op, settle in steps:
                await scenario.play(op)
                if settle:
                    await scenario.catch_up()
                    await asyncio.sleep(SETTLE_S)
            await scenario.catch_up()
            still_reading = list(scenario.reading)
        finally:
            await scenario.close()

    for reader in still_reading:
        assert reader.got == scenario.expected(reader), f"read after {reader.after}"
    for reader in scenario.left:
        assert reader.got == scenario.expected(reader)[: len(reader.got)], (
            f"read after {reader.after}, left"
        )


async def test_a_hub_whose_reads_go_to_a_new_connection_takes_the_bells_position_anew(
    redis_server: RedisServer,
) -> None:
    """A new connection may be a new master's, whose bells (its clock behind, the last ones
    lost) can come before the last bell the hub read: a hub that went on from its old position
    would never see them, and a read made again from there would wait out its block time. The
    read made again asks every stream, and the hub forgets what it knew."""
    redis = Redis.from_url(redis_server.url())
    key = f"test-hub:{uuid.uuid4().hex}"
    async with running_hub(redis, block_ms=BLOCK_MS, read_all_up_to=0) as (hub, _):
        first = await redis.xadd(key, {"n": 0})
        await redis.xadd(BELLS_KEY, {"k": key})
        assert [e[0] for e in await hub.read(key, "0-0")] == [first]
        waiting = hub.read(key, first.decode())  # at the known end: the call leaves it out
        await asyncio.sleep(0.05)
        for client in await redis.client_list():
            if client["cmd"] == "xread" and client["db"] == "0":
                await redis.client_kill_filter(_id=client["id"])
        await asyncio.sleep(0.05)  # the hub's read, made again on a new connection, blocks
        async with redis.pipeline(transaction=True) as pipe:  # as a new master would number it
            pipe.xadd(key, {"n": 1})
            pipe.delete(BELLS_KEY)
            pipe.xadd(BELLS_KEY, {"k": key}, id="1-1")
            second, *_ = await pipe.execute()

        async with asyncio.timeout(3):
            assert [e[0] for e in await waiting] == [second]
    await redis.delete(key, BELLS_KEY)
    await redis.aclose()


async def test_readers_waiting_for_their_first_text_are_read_for_at_once(
    redis_server: RedisServer,
) -> None:
    """After a call that delivered, the next waits out `MIN_CALL_INTERVAL_S`, so that under load
    each brings many entries; not while a reader waits for its stream's first text. Streams
    started together have their first tokens a fraction of a millisecond apart: spaced, all but
    the first waited for the interval."""
    redis = Redis.from_url(redis_server.url())
    lags: list[float] = []
    async with running_hub(redis, block_ms=BLOCK_MS) as (hub, _):
        for _ in range(5):
            keys = [f"test-hub:{uuid.uuid4().hex}:{n}" for n in range(6)]
            waiting = [hub.read(key, "0-0", first_text=True) for key in keys]
            await asyncio.sleep(0.01)  # the hub's call blocks, on every stream
            for key, reader in zip(keys, waiting, strict=True):
                appended = time.monotonic()
                async with redis.pipeline(transaction=True) as pipe:  # as an append script does
                    pipe.xadd(key, {"n": 0})
                    pipe.xadd(BELLS_KEY, {"k": key})
                    await pipe.execute()
                await reader
                lags.append(time.monotonic() - appended)
            await redis.delete(*keys)
    await redis.aclose()

    assert statistics.median(lags) < MIN_CALL_INTERVAL_S / 2, lags


async def test_under_load_a_reader_waiting_for_its_first_text_leaves_the_calls_spaced() -> None:
    """With more streams waited for than `READ_ALL_UP_TO`, calls stay spaced even while a reader
    waits for its first text: under load some stream always does, and calls for every entry
    would undo the batching. Here entries come every half millisecond for half a second."""
    server = RedisServer().start()
    redis = Redis.from_url(server.url())
    keys = [f"test-hub:{uuid.uuid4().hex}:{n}" for n in range(READ_ALL_UP_TO + 4)]
    try:
        async with running_hub(redis, block_ms=BLOCK_MS) as (hub, _):
            starting = hub.read(keys[0], "0-0", first_text=True)  # nothing comes for it
            last = dict.fromkeys(keys[1:], "0-0")

            async def follow(key: str) -> None:
                while True:
                    entries = await hub.read(key, last[key])
                    last[key] = entries[-1][0].decode()

            followers = [asyncio.create_task(follow(key)) for key in keys[1:]]
            await asyncio.sleep(0.05)
            await redis.config_resetstat()
            loop = asyncio.get_running_loop()
            until = loop.time() + 0.5
            while loop.time() < until:
                key = keys[1 + int(loop.time() * 2000) % (len(keys) - 1)]
                async with redis.pipeline(transaction=True) as pipe:  # as an append script does
                    pipe.xadd(key, {"n": 0})
                    pipe.xadd(BELLS_KEY, {"k": key})
                    await pipe.execute()
                await asyncio.sleep(0.0005)
            calls = (await redis.info("commandstats"))["cmdstat_xread"]["calls"]
            for follower in followers:
                follower.cancel()
            starting.cancel()
    finally:
        await redis.aclose()
        server.stop()

    assert calls <= 0.5 / MIN_CALL_INTERVAL_S * 1.5, calls
