"""Fault tests kill real processes; each gets stacks of its own on databases of its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from tests.procs import DATABASES, RedisServer, Stack, start_stack

FAST_LIVENESS = {
    "heartbeat_s": "0.5",  # a worker is dead 1.5 s after its last beat
    "supervise_s": "0.2",
}
_databases = itertools.count(16)

StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(redis_server: RedisServer) -> Iterator[StackFactory]:
    stacks: list[Stack] = []

    def make(workers: int = 1, redis: RedisServer = redis_server, **settings: str) -> Stack:
        db = 16 + (next(_databases) - 16) % (DATABASES - 16)
        stack = start_stack(
            f"fault-db{db}",
            redis.fresh_url(db),
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
