"""More workers, more throughput: the queue spreads jobs over 1, 2 and 4 worker processes.

Each worker serves one job at a time (as a backend that does not batch would) at 100 tokens/s
from the synthetic backend; 16 requests of 40 tokens are sent at once.

    python -m bench.scaling [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx

from bench.common import progress, pyplot, redis_server, save, sluice_stack, table, timed_stream

REQUESTS = 16
TOKENS = 40
RATE = 100


async def burst(url: str) -> tuple[float, int]:
    body = {
        "messages": [{"role": "user", "content": "scale"}],
        "stream": True,
        "max_tokens": TOKENS,
    }
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        start = time.perf_counter()
        timings = await asyncio.gather(
            *(timed_stream(client, "/v1/chat/completions", body) for _ in range(REQUESTS))
        )
        return time.perf_counter() - start, sum(t.ok for t in timings)


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    workers = [r["workers"] for r in rows]
    ax.plot(workers, [r["tokens_per_s"] for r in rows], "o-", label="measured")
    ax.plot(workers, [RATE * w for w in workers], "k:", label="ideal")
    ax.set_xlabel("worker processes (one job each)")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(workers)
    ax.legend()
    ax.set_title(f"{REQUESTS} requests x {TOKENS} tokens")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    rows = []
    counts = [int(n) for n in args.workers.split(",")]
    with redis_server() as server:
        for i, workers in enumerate(counts):
            with sluice_stack(
                server,
                workers,
                backend="synthetic",
                synthetic_tokens_per_s=str(RATE),
                worker_max_jobs="1",
            ) as stack:
                wall, ok = asyncio.run(burst(stack.base_url))
            rows.append(
                {
                    "workers": workers,
                    "completed": ok,
                    "wall_s": wall,
                    "tokens_per_s": ok * TOKENS / wall,
                }
            )
            progress(i + 1, len(counts), "worker scaling")
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    save("scaling", {"rows": rows}, plot(rows))
    print(table(rows, ["workers", "completed", "wall_s", "tokens_per_s", "speedup"]))


if __name__ == "__main__":
    main()
