"""The benchmarks' Redis time counts each command once (bench/common.py, `RedisCommandTime`):
Redis counts a script's commands in their own lines and again in the script's, and SLOWLOG
records them beside the script. Held to against a Redis of the test's own, which nothing else
uses meanwhile."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.common import SCRIPT_COMMANDS, RedisCommandTime
from tests.procs import RedisServer

INNER_CALLS = 2000
SCRIPT = f"for i = 1, {INNER_CALLS} do redis.call('HSET', KEYS[1], 'f' .. i, i) end return 1"


@pytest.fixture
def quiet_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.mark.parametrize("trace", [False, True])
def test_a_scripts_commands_count_once_in_its_time(quiet_redis: RedisServer, trace: bool) -> None:
    assert "hset" in SCRIPT_COMMANDS  # sluice's scripts call it: counted in theirs
    recorder = RedisCommandTime(quiet_redis.url(), {"fill": SCRIPT}, trace=trace)
    recorder.open()
    with quiet_redis.client() as client:
        client.eval(SCRIPT, 1, "filled")
        client.incr("counted")  # INCRBY: no script of sluice calls it
    stats = recorder.close()

    as_redis_counts = stats["by_command_us"]
    assert as_redis_counts["hset"] > 0
    assert stats["usec"] == as_redis_counts["eval"] + as_redis_counts["incrby"]
    if trace:
        assert set(stats["calls"]) == {"eval", "incrby"}  # not a line per HSET
