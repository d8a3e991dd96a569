"""Fencing, property-based, against a real Redis: whatever the interleaving of appends by stale
and current attempts, retries and ends, a stream holds exactly what its current attempt
appended before the end, and nothing after."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from shared.protocol import ACTIVE_KEY, DUE_KEY, Attempt, Entry, Failed, Token, from_fields, job_id
from shared.scripts import lua
from tests.procs import RedisServer
from worker.writer import Fenced, StreamWriter

Op = tuple[str, int]
"""("token" | "end", attempt number) appends as that attempt; ("retry", 0) replaces the
current attempt with the next, as the supervisor does for a lost worker."""

ops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["token", "end"]), st.integers(1, 4)),
        st.just(("retry", 0)),
    ),
    max_size=25,
)
END = Failed({"message": "ended", "type": "server_error", "param": None, "code": None})


@dataclass
class Scene:
    """One stream on a real Redis, a writer per attempt (as if each ran on its own worker)."""

    redis: Redis
    stream_id: str

    def attempt(self, n: int) -> Attempt:
        return Attempt(self.stream_id, job_id(self.stream_id, n))

    async def retry(self, current: int) -> bool:
        old, new = self.attempt(current).job, self.attempt(current + 1).job
        scratch = f"{self.stream_id}:scratch:"  # the queue's and arq's keys, unused here
        replaced = await self.redis.register_script(lua("retry"))(
            keys=[
                self.attempt(1).meta_key,
                *(scratch + key for key in ("queue", "waiting", "old", "new")),
            ],
            args=[old, new, "{}", 60_000, 60, scratch + "wake", self.stream_id, 60_000],
        )
        return bool(replaced)

    async def entries(self) -> list[Entry]:
        return [from_fields(f) for _, f in await self.redis.xrange(self.attempt(1).stream_key)]


async def with_scene(redis_url: str, play: Callable[[Scene], Awaitable[None]]) -> None:
    redis = Redis.from_url(redis_url)
    scene = Scene(redis, f"fence-{uuid.uuid4().hex}")
    first = scene.attempt(1)
    await redis.hset(first.meta_key, "job", first.job)  # type: ignore[misc]
    try:
        await play(scene)
    finally:
        scratch = [key async for key in redis.scan_iter(f"{scene.stream_id}:scratch:*")]
        await redis.delete(first.stream_key, first.meta_key, *scratch)
        await redis.zrem(ACTIVE_KEY, scene.stream_id)
        await redis.zrem(DUE_KEY, scene.stream_id)
        await redis.aclose()


@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_only_the_current_attempt_appends_and_nothing_follows_the_end(
    redis_server: RedisServer, ops: list[Op]
) -> None:
    async def play(scene: Scene) -> None:
        writers = {n: StreamWriter(scene.redis) for n in range(1, 5)}
        current, ended, expected = 1, False, []
        for i, (kind, n) in enumerate(ops):
            if kind == "retry":
                assert await scene.retry(current) == (not ended)
                current += 0 if ended else 1
                continue
            entry: Entry = END if kind == "end" else Token(f"{n}:{i}")
            try:
                await writers[n].append(scene.attempt(n), entry, expire_s=60)
                accepted = True
            except Fenced:
                accepted = False
            assert accepted == (n == current and not ended), (kind, n, current, ended)
            if accepted:
                expected.append(entry)
                ended = kind == "end"
        assert await scene.entries() == expected

    asyncio.run(with_scene(redis_server.url(), play))


@settings(max_examples=30, deadline=None)
@given(before=st.integers(0, 30), stale=st.integers(1, 60), fresh=st.integers(0, 30))
def test_a_stale_attempt_writing_alongside_its_successor_never_lands_after_the_handover(
    redis_server: RedisServer, before: int, stale: int, fresh: int
) -> None:
    """Attempt 1 keeps sending (a worker thawed after it was presumed dead) while the stream is
    handed to attempt 2, which sends too, concurrently: once attempt 2's first entry is in the
    stream, nothing of attempt 1's follows it."""

    async def play(scene: Scene) -> None:
        old, new = StreamWriter(scene.redis), StreamWriter(scene.redis)

        async def send(writer: StreamWriter, n: int, count: int) -> None:
            for i in range(count):
                try:
                    await writer.send(scene.attempt(n), f"{n}:{i} ")
                except Fenced:
                    return
                await asyncio.sleep(0)

        await send(old, 1, before)
        handover = asyncio.ensure_future(scene.retry(1))
        await asyncio.gather(send(old, 1, stale), handover, send(new, 2, fresh))
        await new.append(scene.attempt(2), END, expire_s=60)
        await old.flushed()  # its last batch may still be on its way, refused or not
        assert handover.result()

        written = await scene.entries()
        authors = [
            int(text.split(":")[0])
            for entry in written
            if isinstance(entry, Token)
            for text in entry.text.split()
        ]
        assert authors == sorted(authors)  # every 1 before every 2
        assert authors.count(2) == fresh
        assert written[-1] == END

    asyncio.run(with_scene(redis_server.url(), play))
