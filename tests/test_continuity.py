"""No silent gap, property-based, against a real Redis (issue 24). A stream's entries are
numbered (`<ms>-<n>`, shared/lua/lib/fenced_append.lua); whatever entries go missing, a reader
gets the entries after its position one by one up to the first missing one, then `redis_failover`
(or `stream_truncated` for a stream whose first entry is gone), never an entry after a hole.

Two ways to lose entries. At random (`XDEL`), under entries the writer goes on numbering: the
relay's own check. As a failover loses them: the new master holds a prefix of the stream, its
metadata as it was then, and the worker, which had stored more, writes on: the writer's check
(it must not append after the hole) and the relay's together.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from api.hub import StreamHub
from api.relay import Waiting, follow
from shared.errors import RedisFailover, StreamTruncated
from shared.protocol import Attempt, Failed, Started, Token, encode, job_id
from shared.settings import Settings
from tests.hubs import running_hub
from tests.procs import RedisServer
from worker.writer import EntriesLost, StreamWriter

PAGE = 3  # entries one read returns: gaps fall inside batches and between them
SETTINGS = Settings(backend="synthetic", behind_s=10, max_hold_s=0)
END = Failed({"message": "ended", "type": "server_error", "param": None, "code": "worker_lost"})
READ_S = 2.0
"""No read here waits this long: every entry a reader may get is already stored."""


@contextlib.asynccontextmanager
async def scene(
    redis_server: RedisServer, **hub_options: float
) -> AsyncIterator[tuple[Redis, StreamHub, Attempt]]:
    redis = Redis.from_url(redis_server.url())
    stream_id = f"continuity-{uuid.uuid4().hex}"
    attempt = Attempt(stream_id, job_id(stream_id, 1))
    await redis.hset(attempt.meta_key, "job", attempt.job)
    try:
        async with running_hub(redis, count=PAGE, **hub_options) as (hub, _):
            yield redis, hub, attempt
    finally:
        await redis.delete(attempt.stream_key, attempt.meta_key)
        await redis.aclose()


async def hub_connections(redis: Redis) -> list[dict[str, str]]:
    """The connections of this test's hub: those last used for XREAD on its database (the
    session's stacks read other databases of the same server)."""
    return [c for c in await redis.client_list() if c["cmd"] == "xread" and c["db"] == "0"]


async def write(writer: StreamWriter, attempt: Attempt, tokens: int) -> list[str]:
    """`Started` and `tokens` tokens, each its own entry; their ids."""
    ids = [await writer.append(attempt, Started("w", 1))]
    for n in range(tokens):
        ids.append(await writer.append(attempt, Token(f"{n} ")))
    return ids


async def read(hub: StreamHub, stream_id: str, after: str) -> tuple[list[str], Exception | None]:
    """What a reader after `after` gets: entry ids up to the end, or up to the error."""
    got: list[str] = []
    try:
        async with asyncio.timeout(READ_S):
            async for batch in follow(hub, SETTINGS, stream_id, after):
                if not isinstance(batch, Waiting):
                    got += [entry_id for entry_id, _ in batch]
    except (RedisFailover, StreamTruncated) as exc:
        return got, exc
    return got, None


@settings(max_examples=60, deadline=None, database=None)
@given(
    tokens=st.integers(1, 10),
    data=st.data(),
)
async def test_a_reader_never_gets_an_entry_after_one_that_is_missing(
    redis_server: RedisServer, tokens: int, data: st.DataObject
) -> None:
    async with scene(redis_server) as (redis, hub, attempt):
        writer = StreamWriter(redis)
        writer.begin(attempt, 0, "run")
        ids = await write(writer, attempt, tokens)
        removed = data.draw(st.sets(st.sampled_from(ids)), label="removed")
        if removed:
            await redis.xdel(attempt.stream_key, *removed)
        # The stream goes on after them (its end, numbered next, as the supervisor appends).
        ids.append(await StreamWriter(redis).append(attempt, END, expire_s=60))
        position = data.draw(st.sampled_from(["0-0", *ids[:-1]]), label="after")
        got, error = await read(hub, attempt.stream_id, position)

    after = ids[ids.index(position) + 1 :] if position != "0-0" else ids
    first_missing = next((n for n, i in enumerate(after) if i in removed), None)
    note(f"got {got}, error {error!r}")
    assert got == after[: len(got)]  # in order, from the position on
    if first_missing is not None:  # never past a hole: up to it, then the error
        assert len(got) <= first_missing
        assert error is not None
    elif position not in removed:  # nothing missing: everything, and no alarm
        assert (got, error) == (after, None)
    else:  # its own last entry is gone, none after it: on exactly, or the error
        assert (got, error) == (after, None) or (got == [] and error is not None)


@settings(max_examples=40, deadline=None, database=None)
@given(
    stored=st.integers(1, 10),
    data=st.data(),
    more=st.integers(0, 3),
    ahead_ms=st.sampled_from([0, 3_600_000]),
)
async def test_after_a_failover_that_lost_entries_no_reader_gets_a_gap(
    redis_server: RedisServer, stored: int, data: st.DataObject, more: int, ahead_ms: int
) -> None:
    """The worker stored `stored` tokens on the old master, whose clock was `ahead_ms` ahead of
    the new one's; the new master has the first `keep` entries (and the metadata as it was
    then). The worker's next text is refused (`EntriesLost`), and it ends the stream with an
    error, numbered after every entry it wrote. A reader anywhere, on the entries it had from
    the old master, gets what follows them on the new master, then `redis_failover`: never a
    new entry as if it followed a lost one, and never a wait for ever for entries whose ids
    sort before its own."""
    async with scene(redis_server) as (redis, hub, attempt):
        writer = StreamWriter(redis)
        writer.begin(attempt, 0, "run")
        written = await write(writer, attempt, stored)
        seen = [shifted(entry_id, ahead_ms) for entry_id in written]  # ids as readers had them
        keep = data.draw(st.integers(1, len(seen) - 1), label="keep")
        entries = await redis.xrange(attempt.stream_key)
        meta = await redis.hgetall(attempt.meta_key)
        await fail_over(
            redis, attempt, [(i, f) for i, (_, f) in zip(seen, entries, strict=True)][:keep], meta
        )
        lost: type[Exception] | None = None
        try:
            for n in range(more + 1):
                await writer.append(attempt, Token(f"new {n} "))
        except EntriesLost as exc:
            lost = type(exc)
        end = await writer.append(attempt, END, expire_s=60)
        position = data.draw(st.sampled_from(["0-0", *seen]), label="after")
        got, error = await read(hub, attempt.stream_id, position)

    note(f"got {got}, error {error!r}, end {end}")
    assert lost is EntriesLost  # the writer went on after no hole
    # What the new master has of the old one's entries, then the writer's error numbered after
    # the lost ones: a reader gets kept entries after its position (none if its own entry was
    # lost), then `redis_failover`; never the error entry as if it followed.
    kept_ids = ["0-0", *seen[:keep]]
    after = kept_ids[kept_ids.index(position) + 1 :] if position in kept_ids else []
    assert got == after[: len(got)]
    assert isinstance(error, RedisFailover)


def shifted(entry_id: str, ms: int) -> str:
    at, _, n = entry_id.partition("-")
    return f"{int(at) + ms}-{n}"


async def fail_over(
    redis: Redis,
    attempt: Attempt,
    kept: list[tuple[str, dict[bytes, bytes]]],
    meta: dict[bytes, bytes],
) -> None:
    """The stream and its metadata as a replica that had only `kept` holds them."""
    ms, _, n = kept[-1][0].partition("-")
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(attempt.stream_key)
        for entry_id, fields in kept:
            pipe.xadd(attempt.stream_key, fields, id=entry_id)
        pipe.hset(attempt.meta_key, mapping={**meta, b"n": n, b"wn": n, b"ms": ms})
        await pipe.execute()


async def test_a_reader_waiting_across_a_failover_checks_its_last_entry_by_what_it_was(
    redis_server: RedisServer,
) -> None:
    """A reader has entry 3, a token, and waits. The hub's connection is cut (as a failover
    cuts it) and, meanwhile, the stream became what a new master whose clock is behind would
    hold: entries 1 and 2, then the supervisor's end, which got the lost token's id. Its id is
    there; the entry is not the one the reader had: `redis_failover`, not a wait for ever."""
    async with scene(redis_server, hold_s=5) as (redis, hub, attempt):
        writer = StreamWriter(redis)
        writer.begin(attempt, 0, "run")
        ids = await write(writer, attempt, 2)
        got: list[str] = []
        has_all = asyncio.Event()

        async def reader() -> None:
            async for batch in follow(hub, SETTINGS, attempt.stream_id):
                if not isinstance(batch, Waiting):
                    got.extend(entry_id for entry_id, _ in batch)
                    if got == ids:
                        has_all.set()

        reading = asyncio.create_task(reader())
        async with asyncio.timeout(READ_S):
            await has_all.wait()
        entries = await redis.xrange(attempt.stream_key)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(attempt.stream_key)
            for entry_id, fields in entries[:2]:
                pipe.xadd(attempt.stream_key, fields, id=entry_id)
            pipe.xadd(attempt.stream_key, dict([encode(END)]), id=ids[2])
            await pipe.execute()
        for client in await hub_connections(redis):
            await redis.client_kill_filter(_id=client["id"])
        with pytest.raises(RedisFailover):
            async with asyncio.timeout(READ_S + 2):
                await reading

    assert got == ids


async def test_a_connection_closed_while_the_hub_is_idle_is_made_again_not_reported(
    redis_server: RedisServer,
) -> None:
    """Redis (its `timeout`, a proxy, a `CLIENT KILL`) closes the hub's kept connection while
    nobody reads. The next reader is served on a new connection: a closed idle connection is
    not a lost Redis, and must not end a stream with `redis_unavailable`."""
    async with scene(redis_server) as (redis, hub, attempt):
        writer = StreamWriter(redis)
        writer.begin(attempt, 0, "run")
        ids = await write(writer, attempt, 2)
        ids.append(await StreamWriter(redis).append(attempt, END, expire_s=60))
        assert await read(hub, attempt.stream_id, "0-0") == (ids, None)
        await asyncio.sleep(0.05)  # the hub is idle now: nobody waits
        idle = await hub_connections(redis)
        assert idle
        for client in idle:
            await redis.client_kill_filter(_id=client["id"])

        assert await read(hub, attempt.stream_id, "0-0") == (ids, None)
