"""sluice's pools hand out a connection only when it owes no reply and is open, as redis-py's
own check makes sure, without its wait (shared/redis_url.py, `QuickCheckPool`): the internals of
redis-py and asyncio that check reads, held to against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis._parsers import _AsyncHiredisParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import Redis

from shared.redis_url import QuickCheckPool
from tests.procs import RedisServer

READ_S = 0.05  # for the event loop to read what Redis sent into the connection's buffers


@pytest.fixture
async def one_connection(redis_server: RedisServer) -> AsyncIterator[tuple[QuickCheckPool, Redis]]:
    pool = QuickCheckPool.from_url(redis_server.url(), max_connections=1)
    client = Redis(connection_pool=pool)
    await client.set("test-redis-pool", "value")
    yield pool, client
    await client.delete("test-redis-pool")
    await client.aclose()
    await pool.aclose()


async def test_a_connection_that_owes_a_reply_is_made_again(
    one_connection: tuple[QuickCheckPool, Redis],
) -> None:
    pool, client = one_connection
    connection = await pool.get_connection()
    await connection.send_command("PING")  # its reply is never read
    await asyncio.sleep(READ_S)
    await pool.release(connection)

    assert await client.get("test-redis-pool") == b"value"  # not the stray PONG


async def test_a_connection_redis_closed_is_made_again(
    one_connection: tuple[QuickCheckPool, Redis], redis_server: RedisServer
) -> None:
    _, client = one_connection
    connection_id = await client.client_id()
    with redis_server.client() as admin:
        admin.client_kill_filter(_id=connection_id)
    await asyncio.sleep(READ_S)

    assert await client.get("test-redis-pool") == b"value"
    assert await client.client_id() != connection_id


async def test_the_buffers_the_check_reads_are_where_it_reads_them(
    one_connection: tuple[QuickCheckPool, Redis],
) -> None:
    pool, _ = one_connection
    connection = await pool.get_connection()
    try:
        assert isinstance(connection._reader, asyncio.StreamReader)
        assert isinstance(connection._reader._buffer, bytearray)  # type: ignore[attr-defined]
        assert isinstance(connection._parser, _AsyncHiredisParser)
        assert connection._parser._reader is not None
        assert connection._parser._connected
        assert connection._parser._reader.gets() is NOT_ENOUGH_DATA  # nothing owed
    finally:
        await pool.release(connection)
