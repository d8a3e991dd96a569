"""Supervision has one owner, judges by Redis's clock, and fences out workers presumed dead:
frozen workers, abandoned requests and skewed clocks, on real processes."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
import pytest
import redis

from shared.protocol import TERMINAL, Failed, Started, from_fields, meta_key, stream_key
from tests.faults.conftest import StackFactory, worker_pid
from tests.faults.test_workers import db_client, running_worker
from tests.procs import Stack, eventually
from tests.sse import stream

LONG = {"prompt": "a long answer", "stream": True, "max_tokens": 200}


def entries(r: redis.Redis, stream_id: str) -> list[Any]:
    return [from_fields(fields) for _, fields in r.xrange(stream_key(stream_id))]


def ended(r: redis.Redis, stream_id: str) -> bool:
    found = entries(r, stream_id)
    return bool(found) and isinstance(found[-1], TERMINAL)


def only_active_stream(r: redis.Redis) -> str:
    ids = [key.decode().removeprefix(meta_key("")) for key in r.scan_iter(meta_key("*"))]
    return ids[0] if len(ids) == 1 else ""


async def hang_up_after_headers(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """Start a stream, take its id from the headers and hang up before any event."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        return str(response.headers["x-sluice-stream-id"])


async def test_a_frozen_worker_woken_after_it_was_presumed_dead_cannot_change_the_story(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="20", worker_max_jobs="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        reading = asyncio.create_task(stream(client, LONG))
        with db_client(stack) as r:
            stream_id = await eventually(lambda: only_active_stream(r), "the stream")
            await eventually(lambda: r.xlen(stream_key(stream_id)) >= 5, "a few tokens")
            pid = worker_pid(running_worker(r, stream_id))
            os.kill(pid, signal.SIGSTOP)
            try:
                live = await reading
                length_when_ended = r.xlen(stream_key(stream_id))
            finally:
                os.kill(pid, signal.SIGCONT)
            # The thawed worker has one slot: it serves a new request only once it has dropped
            # the job it was frozen in (its next append was refused).
            await eventually(lambda: stack_has_live_worker(stack), "the worker to beat again")
            after = await stream(client, {"prompt": "after the thaw", "stream": True})
            replay = await stream(client, path=f"/v1/streams/{stream_id}")
            length_after = r.xlen(stream_key(stream_id))

    assert live.errors[-1]["code"] == "worker_lost"
    assert live.events[-1].data == "[DONE]"
    assert not after.errors
    assert (replay.text, replay.errors) == (live.text, live.errors)
    assert length_after == length_when_ended


def stack_has_live_worker(stack: Stack) -> bool:
    return bool(httpx.get(f"{stack.base_url}/ready", timeout=2).json()["workers"])


async def test_a_queued_request_whose_client_hung_up_is_withdrawn_and_never_runs(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(
        workers=1, synthetic_tokens_per_s="20", worker_max_jobs="1", resume_grace_s="0.5"
    )
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        busy = asyncio.create_task(stream(client, {**LONG, "max_tokens": 40}))
        with db_client(stack) as r:
            busy_id = await eventually(lambda: only_active_stream(r), "the busy stream")
            await eventually(lambda: running_worker(r, busy_id), "the busy job to start")
            abandoned = await hang_up_after_headers(
                client, {"prompt": "never mind", "stream": True}
            )
            await eventually(lambda: ended(r, abandoned), "the abandoned stream to end")
            found = entries(r, abandoned)
        first = await busy

    assert not any(isinstance(e, Started) for e in found)
    assert isinstance(found[-1], Failed)
    assert found[-1].error["code"] == "cancelled"
    assert not first.errors


async def test_a_non_streaming_request_whose_client_left_stops_generating(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="10", worker_max_jobs="1")
    body = {"messages": [{"role": "user", "content": "take your time"}]}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=1) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=body)
    with db_client(stack) as r:
        stream_id = await eventually(lambda: only_active_stream(r), "the stream")
        await eventually(lambda: ended(r, stream_id), "generation to stop")
        found = entries(r, stream_id)

    assert isinstance(found[-1], Failed)
    assert found[-1].error["code"] == "cancelled"
    assert len(found) < 40  # the whole answer, ~85 tokens, takes 8 s


@pytest.mark.parametrize(
    ("api_clock", "worker_clock"),
    [(None, "+5s"), (None, "-5s"), ("+5s", None)],
    ids=["worker-ahead", "worker-behind", "api-ahead"],
)
async def test_clocks_seconds_apart_change_nothing(
    make_stack: StackFactory, api_clock: str | None, worker_clock: str | None
) -> None:
    """Liveness, readers and queue order are judged by Redis's clock, not the hosts'."""
    stack = make_stack(
        workers=1,
        synthetic_tokens_per_s="20",
        resume_grace_s="1",
        queue_timeout_s="3",
        api_clock=api_clock,
        worker_clock=worker_clock,
    )
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await stream(client, LONG)  # ~4 s: past every window

    assert result.status == 200
    assert not result.errors
    assert result.text.endswith("will never come.")
