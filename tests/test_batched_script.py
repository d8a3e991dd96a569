"""Calls of a batched script share round trips, yet each gets its own reply or error, and they
run in Redis in the order they were made; against a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.batched_script import BatchedScript
from tests.procs import RedisServer

# Appends ARGV[1] to the list KEYS[1] and returns the list's length; "fail" is refused.
APPEND = """
if ARGV[1] == "fail" then return redis.error_reply("refused") end
return redis.call("RPUSH", KEYS[1], ARGV[1])
"""
CLIENT_NAME = "batched-script-test"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url(), client_name=CLIENT_NAME)
    yield redis
    await redis.aclose()


def fresh_key() -> str:
    return f"test-batched:{uuid.uuid4().hex}"


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(
        st.lists(st.sampled_from(["a", "b", "fail"]), min_size=1, max_size=12),
        min_size=1,
        max_size=5,
    ),
    abandoned=st.sets(st.integers(0, 59)),
)
async def test_each_call_gets_its_own_reply_and_calls_run_in_the_order_made(
    redis_server: RedisServer, groups: list[list[str]], abandoned: set[int]
) -> None:
    """Groups of calls made at once, a group while the one before is on its way; some callers
    give up waiting (their calls still run)."""
    client = Redis.from_url(redis_server.url())
    try:
        script = BatchedScript(client, APPEND)
        key = fresh_key()
        replies: list[asyncio.Future[int]] = []
        made: list[str] = []
        for group in groups:
            for value in group:
                replies.append(script(keys=[key], args=[value]))
                made.append(value)
            await asyncio.sleep(0)
        for index in abandoned & set(range(len(replies))):
            replies[index].cancel()
        outcomes = await asyncio.gather(*replies, return_exceptions=True)
        await script.answered()  # the calls given up on run all the same, maybe later
        stored = [v.decode() for v in await client.lrange(key, 0, -1)]
        await client.delete(key)
    finally:
        await client.aclose()

    assert stored == [value for value in made if value != "fail"]
    length = 0
    for index, (value, outcome) in enumerate(zip(made, outcomes, strict=True)):
        length += value != "fail"
        if index in abandoned:
            assert isinstance(outcome, asyncio.CancelledError)
        elif value == "fail":
            assert isinstance(outcome, ResponseError)
            assert "refused" in str(outcome)
        else:
            assert outcome == length


async def test_calls_made_at_once_share_a_connection(client: Redis) -> None:
    """Unbatched, 200 calls at once would take up to 200 connections, one round trip each."""
    script = BatchedScript(client, APPEND)
    key = fresh_key()
    replies = await asyncio.gather(*(script(keys=[key], args=[str(n)]) for n in range(200)))
    assert replies == list(range(1, 201))
    named = [c for c in await client.client_list() if c["name"] == CLIENT_NAME]
    assert len(named) <= 2  # the batches' and the one asking
    await client.delete(key)


@pytest.fixture
async def own_redis() -> AsyncIterator[tuple[RedisServer, Redis]]:
    """A Redis of the test's own (its scripts are flushed, or it is stopped), and a client."""
    server = RedisServer().start()
    client = Redis.from_url(server.url(), socket_connect_timeout=1)
    yield server, client
    await client.aclose()
    server.stop()


async def test_scripts_redis_lost_are_loaded_again(own_redis: tuple[RedisServer, Redis]) -> None:
    """After a restart (here: SCRIPT FLUSH) Redis answers NOSCRIPT; each call still runs once."""
    _, redis = own_redis
    script = BatchedScript(redis, APPEND)
    key = fresh_key()
    assert await script(keys=[key], args=["x"]) == 1
    await redis.script_flush()
    replies = await asyncio.gather(*(script(keys=[key], args=[str(n)]) for n in range(5)))
    assert replies == [2, 3, 4, 5, 6]
    assert await redis.llen(key) == 6


async def test_a_lost_redis_fails_every_call_of_the_batch(
    own_redis: tuple[RedisServer, Redis],
) -> None:
    server, redis = own_redis
    script = BatchedScript(redis, APPEND)
    key = fresh_key()
    assert await script(keys=[key], args=["x"]) == 1
    server.stop()
    outcomes = await asyncio.gather(
        *(script(keys=[key], args=[str(n)]) for n in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
