"""A quiet stream carries sluice's own keepalive comments and nothing else.

The relay sends `: queued` / `: generating` every `SLUICE_PING_S` and passes sse-starlette
`ping=0`. sse-starlette before 3.4.9 took `ping=0` as a ping every 0 s, about 30,000 comments a
second per stream (its issue #206): pyproject's floor keeps those releases out, and this test
fails on one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.procs import RedisServer, Stack, start_stack
from tests.sse import stream

DB = 7
QUIET_S = 2.0
"""How long a job's first token takes: the stream is quiet until then."""
PING_S = 0.5
KEEPALIVES = {"queued", "generating"}


@pytest.fixture(scope="module")
def quiet(redis_server: RedisServer) -> Iterator[Stack]:
    """One synthetic worker whose first token comes `QUIET_S` after a job starts."""
    stack = start_stack(
        "keepalive",
        redis_server.url(DB),
        1,
        backend="synthetic",
        synthetic_tokens_per_s=str(1 / QUIET_S),
        ping_s=str(PING_S),
    )
    yield stack
    stack.stop()


async def test_a_quiet_stream_carries_only_sluices_keepalive_comments(quiet: Stack) -> None:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=quiet.base_url, timeout=30) as client:
        result = await stream(client, {"prompt": "wait", "stream": True, "max_tokens": 1})
    streamed_s = time.monotonic() - started

    assert result.text == "You"
    assert [c for c in result.comments if c not in KEEPALIVES] == []
    # one per PING_S of quiet at most (a stream is quiet for no longer than it lasts)
    assert 1 <= len(result.comments) <= streamed_s / PING_S + 1
