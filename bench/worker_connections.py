"""A worker's Redis connections as its jobs grow: 1, 100 and 1000 concurrent jobs on one worker.

One `sluice worker` (synthetic backend, 1024 slots) behind one `sluice api`; each level opens N
streams at once, each 20 tokens at 2 tokens/s (10 s), so every job of a level runs at the same
time and 1000 jobs ask for no more tokens per second than 2 cores can relay. The worker's
connections to Redis (its process's established TCP connections to the Redis port) are sampled
every 50 ms. The same levels run on a worker whose pool is bounded (the
default `SLUICE_WORKER_REDIS_CONNECTIONS`) and on one whose bound is out of reach (arq's pool as
it was: a connection per concurrent command), in one run. Per level: peak connections, streams
completed, aggregate tokens/s, each stream's own tokens/s (median) and time to first token.

    python -m bench.worker_connections [--levels 1,100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from typing import Any

import httpx

from bench.common import (
    Timing,
    median,
    pct,
    progress,
    redis_server,
    save,
    sluice_stack,
    table,
    timed_stream,
)
from shared.settings import Settings
from tests.procs import RedisServer
from tests.test_worker_connections import PeakConnections

TOKENS = 20
RATE = 2
WORKER_SLOTS = 1024
UNBOUNDED = 1_000_000
"""A bound no worker reaches: the pool opens a connection whenever none is free, as arq's does."""
MODES = {
    "bounded": Settings.model_fields["worker_redis_connections"].default,
    "unbounded": UNBOUNDED,
}


async def level(url: str, pid: int, redis_port: int, n: int) -> dict[str, Any]:
    # A client (so a connection pool) per stream, as bench/concurrency.py explains, sharing one
    # TLS context: building one per client took longer than the streams.
    tls = ssl.create_default_context()

    async def stream(i: int) -> Timing:
        body = {
            "messages": [{"role": "user", "content": f"job {i}"}],
            "stream": True,
            "max_tokens": TOKENS,
            "stream_options": {"include_usage": True},
        }
        async with httpx.AsyncClient(base_url=url, timeout=600, verify=tls) as client:
            return await timed_stream(client, "/v1/chat/completions", body)

    sampler = PeakConnections(pid, redis_port)
    sampler.start()
    start = time.perf_counter()
    try:
        timings = await asyncio.gather(*(stream(i) for i in range(n)))
    finally:
        sampler.stop()
    wall = time.perf_counter() - start
    ok = [t for t in timings if t.ok and t.chars]
    tokens = sum(t.completion_tokens or 0 for t in ok)
    return {
        "streams": n,
        "completed": len(ok),
        "peak_connections": sampler.peak,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "stream_tokens_per_s_p50": median([t.tokens_per_s for t in ok]),
        "ttft_p50_ms": median([t.ttft_s * 1000 for t in ok]),
        "ttft_p99_ms": pct([t.ttft_s * 1000 for t in ok], 99),
        "first_error": next((t.error for t in timings if t.error), ""),
    }


def run_mode(server: RedisServer, db: int, bound: int, levels: list[int]) -> list[dict[str, Any]]:
    with sluice_stack(
        server,
        1,
        db,
        backend="synthetic",
        synthetic_tokens_per_s=str(RATE),
        worker_max_jobs=str(WORKER_SLOTS),
        worker_redis_connections=str(bound),
        max_queue="100000",
        queue_timeout_s="600",
        access_log="false",
    ) as stack:
        pid = stack.workers[0].pid
        return [asyncio.run(level(stack.base_url, pid, server.port, n)) for n in levels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,100,1000")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    rows: list[dict[str, Any]] = []
    with redis_server() as server:
        for db, (mode, bound) in enumerate(MODES.items()):
            rows += [{"pool": mode, **row} for row in run_mode(server, db, bound, levels)]
            progress(db + 1, len(MODES), "worker connections")
    save("worker_connections", {"rate_tokens_per_s": RATE, "modes": MODES, "levels": rows})
    columns = [
        "pool",
        "streams",
        "completed",
        "peak_connections",
        "tokens_per_s",
        "stream_tokens_per_s_p50",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "wall_s",
    ]
    print(table(rows, columns))


if __name__ == "__main__":
    main()
