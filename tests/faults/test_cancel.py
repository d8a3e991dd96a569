"""A cancel stops generation whatever became of its broadcast, and a queued job nobody reads
does not take a slot from one somebody does."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import redis

from shared.protocol import Started, Token
from tests.faults.conftest import StackFactory
from tests.faults.test_supervision import ended, entries, hang_up_after_headers
from tests.faults.test_workers import db_client, running_worker
from tests.procs import eventually
from tests.sse import stream


async def _drop_subscriptions(r: redis.Redis, stop: asyncio.Event) -> None:
    """Closes every Pub/Sub connection, again and again: a worker subscribing anew at that
    moment misses what is published meanwhile."""
    while not stop.is_set():
        r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await asyncio.sleep(0.01)


async def test_a_cancel_whose_broadcast_is_lost_still_stops_generation_within_a_token(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="10")
    body = {"prompt": "a long answer", "stream": True, "max_tokens": 200}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        reading = asyncio.create_task(stream(client, body))
        with db_client(stack) as r:
            stream_id = await eventually(lambda: _only_stream(r), "the stream")
            await eventually(lambda: _tokens(r, stream_id) >= 3, "a few tokens")
            stop = asyncio.Event()
            dropping = asyncio.create_task(_drop_subscriptions(r, stop))
            try:
                await asyncio.sleep(0.1)
                cancelled_at = time.monotonic()
                answer = await client.post(f"/v1/streams/{stream_id}/cancel")
                result = await asyncio.wait_for(reading, 5)
                took = time.monotonic() - cancelled_at
            finally:
                stop.set()
                with contextlib.suppress(Exception):
                    await dropping
            tokens_at_end = _tokens(r, stream_id)

    assert answer.status_code == 200
    assert result.errors[-1]["code"] == "cancelled"
    assert result.errors[-1]["message"] == "cancelled by request"  # by its worker, once running
    assert result.events[-1].data == "[DONE]"
    assert tokens_at_end < 10  # at 10 tokens/s, cancelled within a token or two
    assert took < 2


async def test_a_queued_job_whose_client_left_does_not_take_a_slot_that_frees_in_its_grace(
    make_stack: StackFactory,
) -> None:
    """One slot, busy for ~2 s. A queued request's client hangs up; one behind it keeps
    reading. The slot frees well inside the resume grace (5 s): the request still read gets
    it, and the one nobody reads never starts (it is withdrawn at the end of its grace). A
    reader's registration lasts 6 s here (3 heartbeats of 2 s): its leaving must be told at
    once, not found when its registration lapses."""
    stack = make_stack(workers=1, synthetic_tokens_per_s="20", worker_max_jobs="1", heartbeat_s="2")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        busy = asyncio.create_task(
            stream(client, {"prompt": "busy", "stream": True, "max_tokens": 40})
        )
        with db_client(stack) as r:
            busy_id = await eventually(lambda: _only_stream(r), "the busy stream")
            await eventually(lambda: running_worker(r, busy_id), "the busy job to start")
            abandoned = await hang_up_after_headers(client, {"prompt": "gone", "stream": True})
            waiting = await stream(
                client, {"prompt": "still here", "stream": True, "max_tokens": 5}
            )
            await eventually(lambda: ended(r, abandoned), "the abandoned stream to end")
            found = entries(r, abandoned)
        await busy

    assert not waiting.errors
    assert not any(isinstance(e, Started) for e in found)
    assert found[-1].error["code"] == "cancelled"


def _only_stream(r: redis.Redis) -> str:
    keys = list(r.scan_iter("sluice:meta:*"))
    return keys[0].decode().removeprefix("sluice:meta:") if len(keys) == 1 else ""


def _tokens(r: redis.Redis, stream_id: str) -> int:
    return sum(isinstance(e, Token) for e in entries(r, stream_id))
