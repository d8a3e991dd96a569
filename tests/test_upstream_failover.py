"""Several `openai` workers serve one model: jobs go to the workers whose engine answers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.protocol import meta_key, serving_key
from tests.procs import RedisServer, Stack, eventually, free_port, start_stack
from tests.sse import stream
from tests.upstreams import LlamaServer

pytestmark = pytest.mark.model

SERVED = "smol"


@pytest.fixture
def half_down(redis_server: RedisServer, llama_server: LlamaServer) -> Iterator[Stack]:
    """Two workers serving `smol`: the first in front of an address where no engine answers,
    the second in front of the session's llama-server."""
    engine = llama_server.model_id()
    stack = start_stack(
        "failover",
        redis_server.fresh_url(48),
        1,
        backend="openai",
        upstream_url=f"http://127.0.0.1:{free_port()}/v1",
        upstream_model=engine,
        served_model_name=SERVED,
        queue_timeout_s="3",  # a job the first worker took would fail within 3 s
    )
    stack.add_worker(SLUICE_UPSTREAM_URL=llama_server.v1)
    yield stack
    stack.stop()


def served_by(r: redis.Redis, stream_id: str) -> str:
    return (r.hget(meta_key(stream_id), "worker") or b"").decode()


async def test_jobs_go_only_to_the_worker_whose_engine_answers(half_down: Stack) -> None:
    body = {"model": SERVED, "prompt": "Rivers:", "max_tokens": 6, "temperature": 0}
    async with httpx.AsyncClient(base_url=half_down.base_url, timeout=60) as client:
        await eventually(lambda: _listed(half_down), "the live engine's worker to announce smol")
        answers = await asyncio.gather(
            *(client.post("/v1/completions", json=body) for _ in range(8))
        )

    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    with redis.Redis.from_url(half_down.redis_url) as r:
        workers = {served_by(r, a.headers["X-Sluice-Stream-Id"]) for a in answers}
    assert len(workers) == 1
    assert f"-{half_down.workers[1].pid}-" in workers.pop()


@pytest.fixture
def both_up(
    redis_server: RedisServer, llama_server: LlamaServer, llama_server_binary: Path
) -> Iterator[tuple[Stack, LlamaServer]]:
    """Two workers serving `smol`, each in front of an engine of its own; the first's engine is
    the test's to kill."""
    doomed = LlamaServer(llama_server_binary, slots=2, threads=1).start()
    stack = start_stack(
        "failover-claimed",
        redis_server.fresh_url(48),
        1,
        backend="openai",
        upstream_url=doomed.v1,
        served_model_name=SERVED,
        queue_timeout_s="30",  # a job left with the first worker would wait this long
    )
    stack.add_worker(SLUICE_UPSTREAM_URL=llama_server.v1)
    yield stack, doomed
    stack.stop()
    doomed.stop()


async def test_jobs_claimed_by_a_worker_whose_engine_dies_go_to_one_whose_engine_answers(
    both_up: tuple[Stack, LlamaServer],
) -> None:
    """The first worker takes every job (the second is frozen meanwhile), then finds its engine
    gone: it gives the jobs back, and the second worker serves them, long before the queue
    timeout."""
    stack, doomed = both_up
    with redis.Redis.from_url(stack.redis_url) as r:
        await eventually(lambda: r.zcard(serving_key(SERVED)) == 2, "both workers serving")
    first, second = stack.workers
    body = {"model": SERVED, "prompt": "Rivers:", "max_tokens": 6, "temperature": 0, "stream": True}
    asked = time.monotonic()
    second.signal(signal.SIGSTOP)
    try:
        doomed.kill()
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
            streams = [
                asyncio.ensure_future(stream(client, body, "/v1/completions")) for _ in range(4)
            ]
            await asyncio.sleep(1)  # the first worker claims them all, and cannot reach its engine
            second.signal(signal.SIGCONT)
            results = await asyncio.gather(*streams)
    finally:
        second.signal(signal.SIGCONT)
    took = time.monotonic() - asked

    for result in results:
        assert result.status == 200
        assert not result.errors
        assert result.text
        assert result.events[-1].data == "[DONE]"
    assert took < 15
    assert "given back" in first.log_tail(400)


def _listed(stack: Stack) -> bool:
    models = httpx.get(f"{stack.base_url}/v1/models", timeout=5).json()["data"]
    return [m["id"] for m in models] == [SERVED]
