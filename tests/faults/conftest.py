"""Fault tests kill real processes; each gets stacks of its own on databases of its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from tests.procs import RedisServer, Stack, start_stack

FAST_LIVENESS = {
    "heartbeat_s": "0.5",  # a worker is dead 1.5 s after its last beat
    "stall_s": "1",
    "relay_check_s": "0.2",
}
_databases = itertools.count(6)

StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(redis_server: RedisServer) -> Iterator[StackFactory]:
    stacks: list[Stack] = []

    def make(workers: int = 1, redis: RedisServer = redis_server, **settings: str) -> Stack:
        db = next(_databases) % 16
        stack = start_stack(
            f"fault-db{db}",
            redis.url(db),
            workers,
            **{"backend": "synthetic", **FAST_LIVENESS, **settings},
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def worker_pid(worker_id: str) -> int:
    """Worker ids are `<host>-<pid>-<random>`."""
    return int(worker_id.rsplit("-", 2)[1])
