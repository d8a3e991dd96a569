"""The `openai` backend's HTTP client, chosen by measure: the CPU a client spends per request to
read an engine's stream, httpx against aiohttp, and the backend itself (aiohttp, and each chunk
turned into pieces), in one run.

The engine is bench/bare.py at 2000 tokens/s (its chunks as an engine sends them, almost no
waiting). Each arm streams `--concurrency` requests of `--tokens` tokens at once, the arms taking
turns round by round; this process is pinned to one core and the engine to another, so that the
process's own CPU time is the client's. Per arm: CPU per request, and wall time per round.

    python -m bench.engine_clients [--rounds 200] [--concurrency 4] [--tokens 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import aiohttp
import httpx
import uvloop

from bench.common import anchor_server, on_cpus, save, table
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends.openai import OpenAIBackend

ENGINE_RATE = "2000"


def body(tokens: int) -> dict[str, Any]:
    return {
        "model": "synthetic",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "max_tokens": tokens,
    }


Arm = Callable[[], Awaitable[int]]
"""One request; how many lines (or pieces) it read."""


@asynccontextmanager
async def arms(url: str, tokens: int) -> AsyncIterator[dict[str, Arm]]:
    request = body(tokens)
    limits = httpx.Limits(max_connections=65, max_keepalive_connections=65)
    client = httpx.AsyncClient(base_url=url, timeout=None, limits=limits)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=65))
    backend = OpenAIBackend(Settings(backend="openai", upstream_url=url))
    job = GenerationJob(stream_id="bench", messages=request["messages"], max_tokens=tokens)

    async def with_httpx() -> int:
        async with client.stream("POST", "/chat/completions", json=request) as response:
            return sum([1 async for line in response.aiter_lines() if line.startswith("data:")])

    async def with_aiohttp() -> int:
        async with session.post(f"{url}/chat/completions", json=request) as response:
            return sum([1 async for line in response.content if line.startswith(b"data:")])

    async def with_backend() -> int:
        generation = await backend.start(job)
        return sum([1 async for _ in generation.pieces])

    try:
        yield {"httpx": with_httpx, "aiohttp": with_aiohttp, "backend": with_backend}
    finally:
        await client.aclose()
        await session.close()
        backend.close()  # its session's close, as a task of its own
        await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))


async def measure(url: str, rounds: int, concurrency: int, tokens: int) -> dict[str, Any]:
    async with arms(url, tokens) as requests:
        cpu = dict.fromkeys(requests, 0.0)
        wall = dict.fromkeys(requests, 0.0)
        for n in range(rounds + 3):  # the first three warm the pools
            for name, one in requests.items():
                cpu0, wall0 = time.process_time(), time.perf_counter()
                counts = await asyncio.gather(*[one() for _ in range(concurrency)])
                if n >= 3:
                    cpu[name] += time.process_time() - cpu0
                    wall[name] += time.perf_counter() - wall0
                assert len(set(counts)) == 1, counts
    rows = [
        {
            "client": name,
            "cpu_ms_per_request": round(cpu[name] * 1000 / (rounds * concurrency), 3),
            "vs_aiohttp": round(cpu[name] / cpu["aiohttp"], 2),
            "wall_ms_per_round": round(wall[name] * 1000 / rounds, 2),
        }
        for name in requests
    ]
    return {"rounds": rounds, "concurrency": concurrency, "tokens": tokens, "clients": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    engine_cpus, client_cpus = {cores[0]}, {cores[-1]}
    with ExitStack() as stack:
        with on_cpus(engine_cpus):
            _, url = stack.enter_context(anchor_server("bench.bare", "--tokens-per-s", ENGINE_RATE))
        with on_cpus(client_cpus):
            data = uvloop.run(measure(f"{url}/v1", args.rounds, args.concurrency, args.tokens))
    print(
        table(data["clients"], ["client", "cpu_ms_per_request", "vs_aiohttp", "wall_ms_per_round"])
    )
    print(save("engine_clients", data))


if __name__ == "__main__":
    main()
