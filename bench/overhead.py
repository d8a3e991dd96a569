"""What the queue and the relay add per request and per token, against the bare anchor.

Per request: the synthetic backend at unlimited rate, one request at a time, through sluice's
full path (API → Redis queue → worker → Redis Stream → relay) and through bench/bare.py (the
same tokens and chunks from the request handler). Queue-added TTFT is sluice's time to first
token minus the anchor's. At unlimited rate sluice joins tokens that pile up (see README, How it
works), so it sends fewer events than tokens; the events per request are reported too.

Per token: the same, paced at 100 tokens/s (slower than the writer's and the relay's 2 ms
batching, so every token is its own event): the relay's latency per token (the worker's write
to Redis, by the entry id's clock, to the client's read) and the CPU per token of the server
processes (for sluice: API, worker and Redis).

In bursts: 16 requests at once, every process on one core (sluice's three and the bare
endpoint, and the load generator, which `lean_stream` keeps light), each stream 2 tokens at
5 tokens/s, so that its first token comes 200 ms after its backend starts, as after an engine's
prefill: what each server adds to the first token beyond those 200 ms (from the request's last
byte sent), and each server process's CPU per request. This is what decides a burst's time to
first token when the server has one core (bench/upstream.py). The two take turns, burst by burst
(`taking_turns`), so that a machine slowing down or speeding up weighs on both alike.

    python -m bench.overhead [--requests 100] [--bursts 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import httpx
import psutil

from bench.common import (
    Timing,
    cpu_seconds,
    lean_stream,
    median,
    on_cpus,
    pct,
    progress,
    pyplot,
    redis_server,
    save,
    sluice_stack,
    table,
    timed_stream,
)
from bench.concurrency import Sampler, bare_server
from tests.procs import RedisServer, Stack

TOKENS = 60  # fewer than the synthetic text has: every request streams exactly this many
PACED_RATE = 100
BODY = {"messages": [{"role": "user", "content": "overhead"}], "stream": True, "max_tokens": TOKENS}
BURST = 16
BURST_RATE = 5.0
BURST_BODY = BODY | {"max_tokens": 2}


async def sequential(url: str, requests: int, label: str) -> list[Timing]:
    timings = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await timed_stream(client, "/v1/chat/completions", BODY)  # warm-up
        for n in range(requests):
            timings.append(await timed_stream(client, "/v1/chat/completions", BODY))
            progress(n + 1, requests, label)
    return timings


async def relay_latencies_ms(url: str, requests: int) -> list[float]:
    """Per content event: from the worker's write (the entry id is Redis's clock, in ms, on
    this machine) to the client's read."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for n in range(requests):
            async with client.stream("POST", "/v1/chat/completions", json=BODY) as response:
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        written_ms = int(line[4:].partition("-")[0])
                        latencies.append(time.time() * 1000 - written_ms)
            progress(n + 1, requests, "sluice, paced")
    return latencies


def cpu_per_token_us(pids: list[int], run: Callable[[], object], tokens: int) -> float:
    processes = Sampler(pids, redis_url=None)
    _, before = processes.cpu_s()
    run()
    _, after = processes.cpu_s()
    return (after - before) / tokens * 1e6


def synthetic_pair(stack: ExitStack, tokens_per_s: float) -> tuple[RedisServer, Stack, str, int]:
    """Redis, sluice on the synthetic backend and the bare endpoint, both at `tokens_per_s`, up
    until `stack` closes; the bare endpoint's URL and process id."""
    server = stack.enter_context(redis_server())
    rate = str(tokens_per_s)
    sluice = stack.enter_context(
        sluice_stack(
            server,
            1,
            backend="synthetic",
            synthetic_tokens_per_s=rate,
            access_log="false",
        )
    )
    bare_url, bare_pid = stack.enter_context(bare_server(tokens_per_s=tokens_per_s))
    return server, sluice, bare_url, bare_pid


def paced(requests: int) -> dict[str, float]:
    with ExitStack() as stack:
        server, sluice, bare_url, bare_pid = synthetic_pair(stack, PACED_RATE)
        latencies: list[float] = []
        tokens = requests * TOKENS
        sluice_pids = [sluice.api.pid, *(w.pid for w in sluice.workers), server.pid]
        sluice_cpu = cpu_per_token_us(
            sluice_pids,
            lambda: latencies.extend(asyncio.run(relay_latencies_ms(sluice.base_url, requests))),
            tokens,
        )
        bare_cpu = cpu_per_token_us(
            [bare_pid], lambda: asyncio.run(sequential(bare_url, requests, "bare, paced")), tokens
        )
    return {
        "relay_latency_p50_ms": median(latencies),
        "relay_latency_p99_ms": pct(latencies, 99),
        "sluice_cpu_per_token_us": sluice_cpu,
        "bare_cpu_per_token_us": bare_cpu,
    }


async def burst_added_ms(url: str) -> list[float]:
    """One burst: per stream, its time to first token beyond its backend's own."""
    timings = await asyncio.gather(
        *(lean_stream(url, "/v1/chat/completions", BURST_BODY) for _ in range(BURST))
    )
    assert all(t.ok for t in timings), [t.error for t in timings if not t.ok]
    return [t.ttft_after_sent_s * 1000 - 1000 / BURST_RATE for t in timings]


async def taking_turns(
    systems: dict[str, tuple[str, dict[str, psutil.Process]]], bursts: int
) -> dict[str, tuple[list[float], dict[str, float]]]:
    """`bursts` bursts to each system, one system's burst after the other's, so that a machine
    that slows down or speeds up meanwhile (a shared virtual machine does) weighs on both
    alike; each system's added times to first token and its processes' CPU seconds."""
    for url, _ in systems.values():
        for _ in range(3):  # first uses cost more
            await burst_added_ms(url)
    out = {name: ([], dict.fromkeys(processes, 0.0)) for name, (_, processes) in systems.items()}
    for n in range(bursts):
        for name, (url, processes) in systems.items():
            added, cpu = out[name]
            before = cpu_seconds(processes)
            added += await burst_added_ms(url)
            await asyncio.sleep(0.05)  # the streams' ends, written after the client's last byte
            after = cpu_seconds(processes)
            for process in processes:
                cpu[process] += after[process] - before[process]
        progress(n + 1, bursts, "in bursts, taking turns")
    return out


def in_bursts(bursts: int) -> dict[str, Any]:
    core = {max(os.sched_getaffinity(0))}
    with on_cpus(core), ExitStack() as stack:
        server, sluice, bare_url, bare_pid = synthetic_pair(stack, BURST_RATE)
        sluice_pids = {"api": sluice.api.pid, "worker": sluice.workers[0].pid, "redis": server.pid}
        sluice_processes = {name: psutil.Process(pid) for name, pid in sluice_pids.items()}
        systems = {
            "sluice": (sluice.base_url, sluice_processes),
            "bare": (bare_url, {"bare": psutil.Process(bare_pid)}),
        }
        measured = asyncio.run(taking_turns(systems, bursts))
    out: dict[str, Any] = {"streams_at_once": BURST, "bursts": bursts}
    requests = BURST * bursts
    for system, (added, cpu) in measured.items():
        out[system] = {
            "added_p50_ms": median(added),
            "added_p95_ms": pct(added, 95),
            "cpu_ms_per_request": {name: s * 1000 / requests for name, s in cpu.items()},
        }
    return out


def row(system: str, timings: list[Timing]) -> dict[str, Any]:
    ok = [t for t in timings if t.ok]
    # Per token, not per event: the relay may coalesce tokens that arrive together.
    per_token = [(t.total_s - t.ttft_s) / (TOKENS - 1) * 1e6 for t in ok]
    return {
        "system": system,
        "ok": len(ok),
        "ttft_p50_ms": median([t.ttft_s * 1000 for t in ok]),
        "ttft_p99_ms": pct([t.ttft_s * 1000 for t in ok], 99),
        "per_token_p50_us": median(per_token),
        "total_p50_ms": median([t.total_s * 1000 for t in ok]),
        # At unlimited rate, tokens that pile up (in the worker's writer, in the relay) are
        # sent together: fewer events than tokens, and a negative per-token difference.
        "content_events_p50": median([t.content_events for t in ok]),
    }


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    figures = ["ttft_p50_ms", "ttft_p99_ms", "total_p50_ms"]
    width = 0.38
    for i, row in enumerate(rows):
        ax.bar(
            [x + i * width for x in range(len(figures))],
            [row[f] for f in figures],
            width,
            label=row["system"],
        )
    ax.set_xticks(
        [x + width / 2 for x in range(len(figures))], ["TTFT p50", "TTFT p99", "total p50"]
    )
    ax.set_ylabel("ms")
    ax.legend()
    ax.set_title(f"one request at a time, {TOKENS} tokens at unlimited rate")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--bursts", type=int, default=40)
    args = parser.parse_args()
    with ExitStack() as stack:
        server = stack.enter_context(redis_server())
        sluice = stack.enter_context(
            sluice_stack(
                server, 1, backend="synthetic", synthetic_tokens_per_s="0", access_log="false"
            )
        )
        rows = [row("sluice", asyncio.run(sequential(sluice.base_url, args.requests, "sluice")))]
        bare_url, _ = stack.enter_context(bare_server(tokens_per_s=0))
        rows.append(row("bare", asyncio.run(sequential(bare_url, args.requests, "bare"))))
    s, b = rows
    added = {
        "queue_added_ttft_p50_ms": s["ttft_p50_ms"] - b["ttft_p50_ms"],
        "queue_added_ttft_p99_ms": s["ttft_p99_ms"] - b["ttft_p99_ms"],
        "relay_added_per_token_us": s["per_token_p50_us"] - b["per_token_p50_us"],
    }
    per_token = paced(max(1, args.requests // 5))
    bursts = in_bursts(args.bursts)
    result = {"systems": rows, "added": added, "paced": per_token, "in_bursts": bursts}
    save("overhead", result, plot(rows))
    print(table(rows, list(rows[0])))
    print(added)
    print(per_token)
    print(bursts)


if __name__ == "__main__":
    main()
