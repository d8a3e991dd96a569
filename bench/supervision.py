"""What keeping watch costs Redis while many streams are open and quiet (issue 26).

One API process and one synthetic worker so slow that a stream, once started, stays open with
no token for the whole run (`SLUICE_SYNTHETIC_TOKENS_PER_S` 0.0001). Background responses are
created up to each level (no client holds a connection), and once the worker runs them all,
Redis records every call for `--seconds`. Per level: the supervisor's script per tick and the
worker's heartbeat per beat (mean and longest, µs), and Redis's time per second in all
commands. The supervisor looks only at streams that need it, and a heartbeat carries only its
worker's own state, so neither should cost more with 10,000 quiet streams than with none.

    python -m bench.supervision [--levels 0,1000,10000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx
import redis

from bench.common import RedisCommandTime, redis_server, save, sluice_stack, table
from shared.protocol import ACTIVE_KEY, ORPHANS_KEY, READERS_KEY, waiting_key
from shared.scripts import LUA, lua

SCRIPTS = {path.stem: lua(path.stem) for path in LUA.glob("*.lua")}
CREATING_AT_ONCE = 32


async def open_streams(url: str, count: int) -> None:
    """`count` more background responses, a few at a time."""
    gate = asyncio.Semaphore(CREATING_AT_ONCE)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def create(n: int) -> None:
            async with gate:
                body = {"input": f"quiet {n}", "background": True, "max_output_tokens": 5}
                answer = await client.post("/v1/responses", json=body)
                answer.raise_for_status()

        await asyncio.gather(*(create(n) for n in range(count)))


def wait_quiet(r: redis.Redis, count: int, timeout_s: float = 600) -> None:
    """Until the worker runs all `count` streams, and the supervisor has found that nobody reads
    them (a background response's reader registration, from its creation, lapses once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        taken = r.zcard(waiting_key("synthetic")) == 0 and r.zcard(ORPHANS_KEY) == 0
        running = r.zcard(ACTIVE_KEY) == count and taken
        if running and r.zcard(READERS_KEY) == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} streams never all ran quietly")


def per_call(stats: dict[str, Any], name: str) -> tuple[float, float]:
    calls = stats["calls"].get(name, 0)
    total = stats["by_call_us"].get(name, 0) if calls else 0
    return (total / calls if calls else 0.0), float(stats["longest_by_call_us"].get(name, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--levels", default="0,1000,10000", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--seconds", default=5.0, type=float)
    args = parser.parse_args()
    rows = []
    with (
        redis_server() as server,
        sluice_stack(
            server,
            1,
            backend="synthetic",
            synthetic_tokens_per_s="0.0001",
            worker_max_jobs=str(max(args.levels) + 16),
            max_queue="100000",
            queue_timeout_s="600",
            access_log="false",
            drain_s="0",
        ) as stack,
    ):
        r = server.client()
        opened = 0
        for level in args.levels:
            asyncio.run(open_streams(stack.base_url, level - opened))
            opened = level
            wait_quiet(r, level)
            recorder = RedisCommandTime(server.url(), SCRIPTS, trace=True)
            recorder.open()
            time.sleep(args.seconds)
            stats = recorder.close()
            tick, tick_max = per_call(stats, "script supervise")
            beat, beat_max = per_call(stats, "script heartbeat")
            rows.append(
                {
                    "open_streams": level,
                    "supervise_us_per_tick": tick,
                    "supervise_longest_us": tick_max,
                    "heartbeat_us_per_beat": beat,
                    "heartbeat_longest_us": beat_max,
                    "redis_us_per_s": stats["usec"] / args.seconds,
                    "redis": stats,
                }
            )
            print(
                f"{level} open streams: supervise {tick:.0f} us/tick, heartbeat {beat:.0f} us/beat"
            )
    save("supervision", {"seconds": args.seconds, "levels": rows})
    print(
        table(
            rows,
            [
                "open_streams",
                "supervise_us_per_tick",
                "supervise_longest_us",
                "heartbeat_us_per_beat",
                "heartbeat_longest_us",
                "redis_us_per_s",
            ],
        )
    )


if __name__ == "__main__":
    main()
