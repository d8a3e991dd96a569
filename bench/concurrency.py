"""Many open streams against one API process, and the same load on the bare anchor.

Each level opens N streams at once; each stream is 60 tokens from the synthetic backend at
30 tokens/s (about 2 s). sluice runs one `sluice api` and one `sluice worker` with 2048 slots; the
anchor (bench/bare.py) streams the same chunks from its request handler. Both are up for the
whole run and take turns: each level runs `--rounds` times on each, alternating which goes
first, so that a noisy machine treats them alike. Per level (the median round): streams
completed and failed, time to first token p50/p99, inter-token gap p99, wall time, content
events per stream (fewer than tokens where the relay coalesced), the API process's CPU and
peak RSS, the CPU of all server processes (for sluice: API, worker and Redis) and of the load
generator, and the Redis connections the API holds. The sluice/bare ratio is the median of the
rounds' ratios.

Redis's own time in commands is reported per stream (`INFO commandstats`), with the calls
that held it for over 1 ms.

    python -m bench.concurrency [--levels 1,10,100,500,1000,2000] [--rounds 3] [--trace-redis]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psutil
import redis

from api.main import API_CLIENT_NAME
from bench.common import (
    RedisCommandTime,
    Timing,
    anchor_server,
    lean_stream,
    median,
    pct,
    process_cpu_s,
    progress,
    pyplot,
    redis_server,
    save,
    sluice_stack,
    sweep_arguments,
    table,
)
from shared.scripts import lua

TOKENS = 60
RATE = 30
WORKER_SLOTS = 2048  # one worker: several would all race to claim every queued job (arq)


def body(n: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"stream {n}"}],
        "stream": True,
        "max_tokens": TOKENS,
    }


@contextmanager
def bare_server(tokens_per_s: float = RATE) -> Iterator[tuple[str, int]]:
    """bench/bare.py at `tokens_per_s`; its URL and process id."""
    with anchor_server("bench.bare", "--tokens-per-s", str(tokens_per_s)) as (server, url):
        yield url, server.pid


class Sampler:
    """Samples the front process's (sluice's API) memory and Redis connections during a level,
    and the CPU time of every server process (for sluice: API, workers and Redis)."""

    def __init__(self, pids: list[int], redis_url: str | None) -> None:
        self.process = psutil.Process(pids[0])
        self.processes = [psutil.Process(pid) for pid in pids]
        self.redis = redis.Redis.from_url(redis_url) if redis_url else None
        self.peak_rss_mb = 0.0
        self.peak_connections = 0

    def sample(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, self.process.memory_info().rss / 2**20)
        if self.redis is not None:
            clients = self.redis.client_list()
            self.peak_connections = max(
                self.peak_connections, sum(c.get("name") == API_CLIENT_NAME for c in clients)
            )

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds so far: the front process's, and all server processes' together."""
        times = [process_cpu_s(p) for p in self.processes]
        return times[0], sum(times)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            await asyncio.sleep(0.25)


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    pids: list[int]
    """The server processes: the front one (sluice's API) first."""
    redis_url: str | None = None


SCRIPTS = {
    name: lua(name)
    for name in (
        "append",
        "submit",
        "supervise",
        "claim_jobs",
        "claim_stream",
        "heartbeat",
        "refresh_readers",
    )
}


async def level(target: Target, n: int, trace: bool = False) -> dict[str, Any]:
    sampler = Sampler(target.pids, target.redis_url)
    redis_time = RedisCommandTime(target.redis_url, SCRIPTS, trace) if target.redis_url else None
    if redis_time is not None:
        redis_time.open()
    stop = asyncio.Event()

    async def stream(i: int) -> Timing:
        # A connection of its own per stream, in plain asyncio streams: the load generator
        # shares the two cores with the servers, and an httpx client per stream cost it four
        # times the CPU (time taken from sluice's three processes more than from bare's one).
        return await lean_stream(target.url, "/v1/chat/completions", body(i))

    front_before, all_before = sampler.cpu_s()
    client_before = time.process_time()
    watcher = asyncio.create_task(sampler.run(stop))
    start = time.perf_counter()
    timings: list[Timing] = await asyncio.gather(*(stream(i) for i in range(n)))
    wall = time.perf_counter() - start
    stop.set()
    await watcher
    client_cpu = time.process_time() - client_before
    front_after, all_after = sampler.cpu_s()
    redis_stats = redis_time.close() if redis_time is not None else None
    ok = [t for t in timings if t.ok and t.chars]
    gaps = [g for t in ok for g in t.gaps_s]
    return {
        "system": target.label,
        "streams": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "wall_s": wall,
        "ttft_p50_ms": median([t.ttft_s * 1000 for t in ok]),
        "ttft_p99_ms": pct([t.ttft_s * 1000 for t in ok], 99),
        "gap_p99_ms": pct(gaps, 99) * 1000,
        "events_per_stream": sum(t.content_events for t in ok) / max(len(ok), 1),
        "tokens_per_s": sum(TOKENS for _ in ok) / wall,
        "front_cpu_pct": 100 * (front_after - front_before) / wall,
        "all_servers_cpu_pct": 100 * (all_after - all_before) / wall,
        "load_generator_cpu_pct": 100 * client_cpu / wall,
        "server_rss_mb": sampler.peak_rss_mb,
        "redis_connections": sampler.peak_connections if target.redis_url else None,
        "first_error": next((t.error for t in timings if t.error), ""),
        "redis_ms_per_stream": redis_stats["usec"] / 1000 / n if redis_stats else None,
        "redis_calls_over_1ms": redis_stats["calls_over_1ms"] if redis_stats else None,
        "redis_longest_ms": max(redis_stats["longest_us"].values(), default=0) / 1000
        if redis_stats
        else None,
        "redis": redis_stats,
    }


def sweep(
    targets: tuple[Target, Target], levels: list[int], rounds: int, trace: bool = False
) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]]]:
    """Every round of every level on both targets, taking turns; the median round per system
    and level, and per level the median of the rounds' sluice/bare ratios."""
    rows: list[dict[str, Any]] = []
    ratios: dict[int, dict[str, float]] = {}
    done, total = 0, len(levels) * rounds * 2
    for n in levels:
        runs: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
        for r in range(rounds):
            for target in targets if r % 2 == 0 else targets[::-1]:
                runs[target.label].append({**asyncio.run(level(target, n, trace)), "round": r})
                done += 1
                progress(done, total, f"concurrency {n} streams")
        sluice, bare = (runs[t.label] for t in targets)
        for system_runs in (sluice, bare):
            system_runs.sort(key=lambda row: row["wall_s"])
            rows.append({**system_runs[len(system_runs) // 2], "rounds": system_runs})
        sluice.sort(key=lambda row: row["round"])
        bare.sort(key=lambda row: row["round"])
        ratios[n] = {
            "wall_sluice_over_bare": median(
                [s["wall_s"] / b["wall_s"] for s, b in zip(sluice, bare, strict=True)]
            ),
            "throughput_sluice_over_bare": median(
                [s["tokens_per_s"] / b["tokens_per_s"] for s, b in zip(sluice, bare, strict=True)]
            ),
            "failed_streams": float(sum(row["failed"] for row in sluice)),
        }
    return rows, ratios


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for system, style in (("sluice", "o-"), ("bare", "s--")):
        mine = [r for r in rows if r["system"] == system]
        x = [r["streams"] for r in mine]
        axes[0].plot(x, [r["wall_s"] for r in mine], style, label=system)
        axes[1].plot(x, [r["ttft_p99_ms"] for r in mine], style, label=system)
        axes[2].plot(x, [r["all_servers_cpu_pct"] for r in mine], style, label=system)
    for ax, title in zip(
        axes, ["wall time (s)", "TTFT p99 (ms)", "CPU of all server processes (%)"], strict=True
    ):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{TOKENS} tokens per stream at {RATE} tokens/s; one API process")
    return fig


def main() -> None:
    parser = sweep_arguments(__doc__, levels="1,10,100,500,1000,2000")
    parser.add_argument(
        "--trace-redis",
        action="store_true",
        help="record every Redis call, to give Redis's time by call (slows Redis a little)",
    )
    args = parser.parse_args()
    levels: list[int] = args.levels
    workers = max(1, -(-max(levels) // WORKER_SLOTS))
    with ExitStack() as stack:
        server = stack.enter_context(redis_server())
        sluice = stack.enter_context(
            sluice_stack(
                server,
                workers,
                backend="synthetic",
                synthetic_tokens_per_s=str(RATE),
                worker_max_jobs=str(WORKER_SLOTS),
                max_queue="100000",
                queue_timeout_s="600",
                access_log="false",  # as the bare anchor: no line per request
            )
        )
        bare_url, bare_pid = stack.enter_context(bare_server())
        targets = (
            Target(
                "sluice",
                sluice.base_url,
                [sluice.api.pid, *(w.pid for w in sluice.workers), server.pid],
                server.url(),
            ),
            Target("bare", bare_url, [bare_pid]),
        )
        rows, ratios = sweep(targets, levels, args.rounds, args.trace_redis)
    save("concurrency", {"rounds": args.rounds, "levels": rows, "ratios": ratios}, plot(rows))
    columns = [
        "system",
        "streams",
        "completed",
        "failed",
        "wall_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "gap_p99_ms",
        "events_per_stream",
        "front_cpu_pct",
        "all_servers_cpu_pct",
        "load_generator_cpu_pct",
        "server_rss_mb",
        "redis_connections",
        "redis_ms_per_stream",
        "redis_calls_over_1ms",
        "redis_longest_ms",
    ]
    print(table(rows, columns))
    print(
        table(
            [{"streams": n, **r} for n, r in ratios.items()],
            ["streams", "wall_sluice_over_bare", "throughput_sluice_over_bare", "failed_streams"],
        )
    )


if __name__ == "__main__":
    main()
