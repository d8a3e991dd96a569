"""sluice's pools hand out a connection only when it owes no reply and is open, as redis-py's
own check makes sure, without its wait (shared/redis_url.py, `QuickCheckPool`): the internals of
redis-py and asyncio that check reads, held to against a real Redis. Their connections pack
commands into the bytes redis-py's would (`FastPacking`), and refuse what it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers import _AsyncHiredisParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.exceptions import DataError

from shared.redis_url import (
    FastPacking,
    QuickCheckPool,
    SentinelBlockingPool,
    fast_packing,
    worker_redis,
)
from shared.settings import Settings
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


arguments = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.binary().map(memoryview),
)
command_names = st.sampled_from(["EVALSHA", "CONFIG GET", b"XREAD", b"CLIENT LIST", "get"])


@given(name=command_names, args=st.lists(arguments, max_size=40))
def test_commands_pack_to_the_bytes_redis_py_packs(name: str | bytes, args: list[Any]) -> None:
    ours, theirs = fast_packing(Connection)(), Connection()
    assert b"".join(ours.pack_command(name, *args)) == b"".join(
        bytes(part) for part in theirs.pack_command(name, *args)
    )


@pytest.mark.parametrize("refused", [True, None, object()])
def test_what_redis_py_refuses_to_pack_is_refused(refused: object) -> None:
    with pytest.raises(DataError):
        fast_packing(Connection)().pack_command("SET", "key", refused)


async def test_every_pool_of_sluice_packs_fast(redis_server: RedisServer) -> None:
    tls_pool = QuickCheckPool.from_url(f"rediss://127.0.0.1:{redis_server.port}")
    sentinel_pool = SentinelBlockingPool("sluice", Sentinel([("127.0.0.1", 1)]))
    worker = worker_redis(Settings(redis_url=redis_server.url()), "test")
    for pool in (tls_pool, sentinel_pool, worker.connection_pool):
        assert issubclass(pool.connection_class, FastPacking), pool
    assert issubclass(sentinel_pool.connection_class, SentinelManagedConnection)
    assert await worker.echo("packed") == b"packed"  # and Redis reads what it packs
    await worker.aclose(close_connection_pool=True)
