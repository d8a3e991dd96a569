"""An API process that dies or is told to stop: clients resume elsewhere or get a clean end."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
import redis

from tests.faults.conftest import StackFactory
from tests.procs import Stack, eventually
from tests.sse import stream


@pytest.fixture
def two_apis(make_stack: StackFactory) -> tuple[Stack, str]:
    stack = make_stack(workers=1, synthetic_tokens_per_s="20")
    return stack, stack.add_replica()[1]


async def test_api_killed_mid_stream_client_resumes_on_another_with_nothing_lost(
    two_apis: tuple[Stack, str],
) -> None:
    stack, replica_url = two_apis
    seen: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):  # noqa: PT012 - the cut happens while reading
            async with client.stream(
                "POST", "/v1/chat/completions", json={"prompt": "keep going", "stream": True}
            ) as response:
                event_id = ""
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: ") and event_id:
                        seen.append((event_id, line[6:]))
                        if len(seen) == 5:
                            stack.api.signal(signal.SIGKILL)
    stream_id = response.headers["x-sluice-stream-id"]

    async with httpx.AsyncClient(base_url=replica_url, timeout=30) as client:
        rest = await stream(
            client, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": seen[-1][0]}
        )
        whole = await stream(client, path=f"/v1/streams/{stream_id}")

    head = "".join(json.loads(d)["choices"][0]["delta"]["content"] for _, d in seen)
    assert head + rest.text == whole.text
    assert whole.text.endswith("will never come.")


async def test_api_sigterm_lets_short_streams_finish_and_ends_long_ones_cleanly(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="20", shutdown_grace_s="2")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        short = asyncio.create_task(
            stream(client, {"prompt": "short", "stream": True, "max_tokens": 8})
        )
        long = asyncio.create_task(stream(client, {"prompt": "long", "stream": True}))
        with redis.Redis.from_url(stack.redis_url) as r:
            await eventually(lambda: len(list(r.scan_iter("sluice:stream:*"))) == 2, "both begun")
        stack.api.signal(signal.SIGTERM)
        finished, cut = await asyncio.gather(short, long)

    assert not finished.errors
    assert finished.text == "You asked: short\n\nStreaming sends each token to"
    assert cut.events[-1].data == "[DONE]"
    assert cut.errors[-1]["code"] == "shutting_down"
    assert stack.api.stop(timeout=10) == 0
