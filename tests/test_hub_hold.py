"""With Sentinels, the API's stream reader waits out a failover (`hold_s`, SLUICE_REDIS_FAILOVER_S):
its readers keep their place while Redis is away and get what comes after it from the next
master; past the hold they end with `redis_failover`, never a wait for ever (issue 24). Against
a real redis-server, killed and started again on its port."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from redis.asyncio import Redis

from shared.errors import RedisFailover, RedisUnavailable
from tests.hubs import running_hub
from tests.procs import RedisServer

KEY = "hub-hold:stream"


async def test_a_reader_keeps_its_place_while_redis_is_away_for_less_than_the_hold() -> None:
    server = RedisServer().start()
    again = RedisServer(server.port)
    redis = Redis.from_url(server.url(), socket_connect_timeout=0.5)
    try:
        first = await redis.xadd(KEY, {"n": 1})
        async with running_hub(redis, block_ms=200, hold_s=10) as (hub, _):
            reading = hub.read(KEY, first.decode())
            server.signal(signal.SIGKILL)
            server.stop()
            await asyncio.sleep(1.0)  # its reads fail meanwhile
            assert not reading.done()
            again.start()  # empty, as a new master that had the entry would not be
            await redis.xadd(KEY, {"n": 2}, id="9999999999999-1")
            entries = await asyncio.wait_for(reading, 5)
            assert hub.epoch > 0  # the relay then checks its place is still there
    finally:
        await redis.aclose()
        server.stop()
        again.stop()

    assert [entry_id for entry_id, _ in entries] == [b"9999999999999-1"]


@pytest.mark.parametrize(("hold_s", "error"), [(1.0, RedisFailover), (0.0, RedisUnavailable)])
async def test_a_reader_ends_once_redis_is_away_for_longer_than_the_hold(
    hold_s: float, error: type[Exception]
) -> None:
    """Past the hold, `redis_failover`; without one (a single Redis), `redis_unavailable` at
    once, as before."""
    server = RedisServer().start()
    redis = Redis.from_url(server.url(), socket_connect_timeout=0.5)
    try:
        async with running_hub(redis, block_ms=200, hold_s=hold_s) as (hub, _):
            reading = hub.read(KEY, "0-0")
            await asyncio.sleep(0.1)
            server.signal(signal.SIGKILL)
            gone_at = time.monotonic()
            with pytest.raises(error):
                await asyncio.wait_for(reading, hold_s + 5)
            ended_after = time.monotonic() - gone_at
    finally:
        await redis.aclose()
        server.stop()

    assert hold_s <= ended_after < hold_s + 3
