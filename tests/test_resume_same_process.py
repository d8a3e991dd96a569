"""A client that resumes a stream on the API process its first connection still reads from (a
network drop the server has not noticed yet) gets every entry after its Last-Event-ID (issue 12).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from shared.protocol import entry_id_key
from tests.procs import RedisServer, Stack, start_stack
from tests.sse import SSEResult, parse_sse, stream

DB = 11
SEEN = 15
"""Events the first connection has read when the client resumes; it reads on meanwhile."""
PASSAGE_END = "will never come."


@pytest.fixture(scope="module")
def single(redis_server: RedisServer) -> Iterator[Stack]:
    """One API process, one worker at 50 tokens/s: the first connection is live for seconds."""
    stack = start_stack(
        "resume-same",
        redis_server.url(DB),
        1,
        backend="synthetic",
        synthetic_tokens_per_s="50",
    )
    yield stack
    stack.stop()


@pytest.fixture
async def client(single: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=single.base_url, timeout=30) as c:
        yield c


async def read_to_the_end(
    client: httpx.AsyncClient, body: dict[str, Any], seen: asyncio.Future[SSEResult]
) -> SSEResult:
    """POST `body` and read its whole event stream; `seen` gets the first SEEN events as they
    arrive, while the reading goes on."""
    lines: list[str] = []
    count = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            if line == "" and len(lines) > 1 and lines[-2].startswith("data: "):
                count += 1
                if count == SEEN:
                    head, _ = parse_sse(lines)
                    seen.set_result(SSEResult(response.status_code, response.headers, head))
        events, comments = parse_sse(lines)
    return SSEResult(response.status_code, response.headers, events, comments)


@pytest.mark.parametrize("cut", [1, 3, 6, 9, 12])
async def test_resume_on_the_same_process_while_the_first_connection_reads_loses_nothing(
    client: httpx.AsyncClient, cut: int
) -> None:
    seen: asyncio.Future[SSEResult] = asyncio.get_running_loop().create_future()
    first = asyncio.create_task(
        read_to_the_end(client, {"prompt": f"resume at event {cut}", "stream": True}, seen)
    )
    head = await seen
    stream_id = head.headers["x-sluice-stream-id"]
    cursor = head.events[cut].id or ""
    assert not first.done()

    resumed = await stream(
        client, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": cursor}
    )
    original = await first
    replay = await stream(client, path=f"/v1/streams/{stream_id}")

    assert original.text == replay.text
    assert original.text.endswith(PASSAGE_END)
    after_cut = SSEResult(original.status, original.headers, original.events[cut + 1 :])
    assert resumed.text == after_cut.text
    ids = [entry_id_key(e.id) for e in resumed.events if e.id]
    assert ids == sorted(set(ids))
    assert ids[0] > entry_id_key(cursor)
