"""What an operator sees: Prometheus metrics, liveness and readiness, JSON logs; real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.conftest import StackFactory
from tests.procs import RedisServer, Stack, eventually, free_port
from tests.sse import stream

MODEL = "synthetic"


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(url: str, name: str, **labels: str) -> float:
    return samples(url).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def stack(make_stack: StackFactory) -> Stack:
    return make_stack(workers=1, synthetic_tokens_per_s="200", worker_metrics_port=str(free_port()))


async def test_after_n_streams_every_request_histogram_counts_n(stack: Stack) -> None:
    n = 3
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        results = await asyncio.gather(
            *(stream(client, {"prompt": f"hi {i}", "stream": True}) for i in range(n))
        )
        collected = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )

    assert all(r.events[-1].data == "[DONE]" for r in results)
    assert collected.status_code == 200
    for histogram in (
        "sluice_time_to_first_token_seconds",
        "sluice_request_queue_time_seconds",
        "sluice_request_prefill_time_seconds",
        "sluice_e2e_request_latency_seconds",
    ):
        assert sample(stack.base_url, f"{histogram}_count", model=MODEL) == n + 1, histogram
    assert sample(stack.base_url, "sluice_relay_delay_seconds_count", model=MODEL) >= n + 1
    assert sample(stack.base_url, "sluice_requests_total", model=MODEL, outcome="stop") == n + 1
    tokens = sample(stack.base_url, "sluice_generation_tokens_total", model=MODEL)
    assert tokens == sum(len(r.text.split()) for r in results) + len(
        collected.json()["choices"][0]["message"]["content"].split()
    )
    assert sample(stack.base_url, "sluice_prompt_tokens_total", model=MODEL) > 0
    assert sample(stack.base_url, "sluice_workers", model=MODEL) == 1


async def test_time_to_first_token_counts_from_the_requests_arrival(
    make_stack: StackFactory,
) -> None:
    """What comes before the queue counts too (parsing, admission, the submit): here a submit
    held up by a paused Redis, on a Redis of this test's own."""
    paused_s = 1.0
    own = RedisServer().start()
    try:
        stack = make_stack(workers=1, redis=own, synthetic_tokens_per_s="200")
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
            await stream(client, {"prompt": "the model is known", "stream": True})
            own.signal(signal.SIGSTOP)
            try:
                held = asyncio.create_task(stream(client, {"prompt": "held", "stream": True}))
                await asyncio.sleep(paused_s)
            finally:
                own.signal(signal.SIGCONT)
            result = await held
        ttft_sum = sample(stack.base_url, "sluice_time_to_first_token_seconds_sum", model=MODEL)
    finally:
        own.stop()

    assert result.events[-1].data == "[DONE]"
    assert not result.errors
    assert ttft_sum >= paused_s


async def test_the_worker_serves_its_own_metrics(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        await stream(client, {"prompt": "count me", "stream": True})
    worker_url = f"http://127.0.0.1:{stack.env['SLUICE_WORKER_METRICS_PORT']}"

    assert sample(worker_url, "sluice_worker_tokens_total", phase="decode") > 0
    assert sample(worker_url, "sluice_worker_tokens_total", phase="prefill") > 0


async def test_requests_waiting_counts_what_a_frozen_worker_leaves_queued(stack: Stack) -> None:
    [worker] = stack.workers
    body = {"prompt": "wait for me", "stream": True}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            waiting = [asyncio.create_task(stream(client, body)) for _ in range(2)]
            counted = await eventually(
                lambda: sample(stack.base_url, "sluice_requests_waiting", model=MODEL) == 2,
                "two waiting",
            )
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        done = await asyncio.gather(*waiting)

    assert counted
    assert [r.events[-1].data for r in done] == ["[DONE]", "[DONE]"]


async def test_with_no_live_worker_ready_is_503_and_health_200(stack: Stack) -> None:
    stack.workers[0].stop()
    await eventually(
        lambda: httpx.get(f"{stack.base_url}/ready", timeout=2).status_code == 503, "not ready"
    )
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=5) as client:
        ready, health = await client.get("/ready"), await client.get("/health")

    assert ready.json()["reasons"] == ["no_workers"]
    assert health.status_code == 200


def json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


async def test_json_logs_parse_and_carry_the_stream_id_on_both_sides(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, log_format="json", api_keys="sk-logged")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await stream(
            client,
            {"prompt": "log me", "stream": True},
            headers={"Authorization": "Bearer sk-logged"},
        )
    stream_id = result.headers["x-sluice-stream-id"]
    api_log, worker_log = stack.api.log_path, stack.workers[0].log_path
    assert api_log is not None
    assert worker_log is not None
    await eventually(
        lambda: any(line.get("stream_id") == stream_id for line in json_lines(worker_log)),
        "the worker's line",
    )

    for path in (api_log, worker_log):
        text = path.read_text()
        mine = [line for line in json_lines(path) if line.get("stream_id") == stream_id]
        assert mine, path.name
        assert all(line["key"].startswith("static-") for line in mine)
        assert "sk-logged" not in text


def queue_shown(screen: str) -> str:
    """The screen once it shows one job queued behind the busy worker (its heartbeat says)."""
    return screen if "1 waiting, 1 running" in screen and "1/1 busy" in screen else ""


async def test_sluice_status_shows_the_queue_workers_streams_and_throughput(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="20", worker_max_jobs="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        body = {"prompt": "keep the worker busy", "stream": True}
        running = [asyncio.create_task(stream(client, body)) for _ in range(2)]
        screen = await eventually(lambda: queue_shown(stack.status()), "one job queued")
        await asyncio.gather(*running)
    after = stack.status()

    assert "2 open" in screen
    assert "0 waiting, 0 running" in after
    assert "tokens/s   0.0" not in after  # the two finished streams' tokens


def spans(trace_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(trace_dir.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def spans_once_generated(trace_dir: Path) -> list[dict[str, Any]]:
    found = spans(trace_dir)
    return found if {"queue", "generate"} <= {s["name"] for s in found} else []


async def test_one_trace_per_request_spans_the_api_and_the_worker(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = make_stack(workers=1, trace_dir=str(tmp_path))
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await stream(client, {"prompt": "trace me", "stream": True})
    stream_id = result.headers["x-sluice-stream-id"]
    found = await eventually(lambda: spans_once_generated(tmp_path), "the worker's spans")
    root = next(s for s in found if s["attributes"].get("sluice.stream_id") == stream_id)
    children = [s for s in found if s["parent_id"] == root["context"]["span_id"]]

    assert root["resource"]["attributes"]["service.name"] == "sluice-api"
    assert root["attributes"]["sluice.outcome"] == "stop"
    assert {s["name"] for s in children} == {"queue", "generate"}
    assert {s["context"]["trace_id"] for s in children} == {root["context"]["trace_id"]}
    assert {s["resource"]["attributes"]["service.name"] for s in children} == {"sluice-worker"}
