"""What sluice costs in front of an engine (issue 15): the same streams through sluice to
llama-server, through the thinnest Python gateway to it, and straight to it, at 4 and 16 at once,
in two layouts, in one run.

  sluice           `sluice api` + one `sluice worker` with SLUICE_BACKEND=openai, whose upstream is
                   the llama-server below
  proxy            bench/proxy.py: FastAPI and sse-starlette, as sluice's API, relaying the
                   engine's stream from the request handler (no queue, Redis or worker): what any
                   gateway on these frameworks costs, so that sluice's queue shows beyond it
  direct           the same llama-server (`-np 16`), asked directly

  shared           llama-server with a thread per core, on every core, which sluice (API, worker,
                   Redis) and the load generator share with it
  isolated         llama-server alone on CPU 0, with one thread; sluice, Redis and the load
                   generator on the other cores: an engine on a device of its own, as deployed.
                   The direct arm's engine is just as alone.

llama.cpp's own server on the bundled GGUF (SmolLM2-135M Q4_1), built by deploy/llama-server.sh.
Each request: the chat format, greedy, max_tokens 128, a prompt of its own (a request number
first, so no stream answers from another's cached prompt), each on a connection of its own
(`common.lean_stream`: a load generator that costs the shared core little). Per layout, the three
take turns, `--rounds` times per level, each going first in turn. Per layout and level:
aggregate tokens/s (every stream's tokens, as the engine counts them, over the time from the
first request to the last end), time to first token p50/p95, and each process's CPU time per
token generated, for each; then, round by round, sluice's aggregate over direct's and the time
to first token sluice adds (to the round's p50 and p95), each the median over rounds.

That end-to-end difference swings by a second from round to round at 16 streams: the engine
batches the prompts that have arrived when it starts a step, so a few milliseconds' spread in
arrival moves a stream's first token by whole prefill batches, one way or the other. What sluice
itself adds is therefore also taken per stream: its time to first token at the client (from the
request's last byte sent, so that the load generator's own work before it is left out), less the
engine's own, as the worker saw it (from asking the engine to its first token; the worker logs it
with each finished stream). The proxy's share is taken the same way (it logs the engine's).
Goals: at least 0.9x the aggregate, at most 10 ms added by sluice at the median.

    python -m bench.upstream [--layouts shared,isolated] [--levels 4,16] [--rounds 6]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import psutil

from bench import common
from tests.procs import Proc, wait_until
from tests.upstreams import LlamaServer, llama_server_binary

MAX_TOKENS = 128
SYSTEMS = ["sluice", "proxy", "direct"]
LAYOUTS = ["shared", "isolated"]
TOPICS = ["the ocean", "volcanoes", "photosynthesis", "jazz", "chess", "honey bees", "the moon"]
PROCESSES = ["engine", "api", "worker", "redis", "proxy", "load"]
"""Whose CPU time is measured: `load` is this process, the load generator."""
_request_ids = itertools.count(1)
FIRST_TOKEN_LOGS = {
    "sluice": re.compile(
        r"finished: .* the first ([0-9.]+) ms after the backend was asked .*\[stream (\w+)\]"
    ),
    "proxy": re.compile(r"engine first token ([0-9.]+) ms after it was asked \[stream (\w+)\]"),
}
"""Where each gateway logs the engine's own time to first token, per stream id."""


@dataclass(frozen=True)
class Layout:
    name: str
    engine_threads: int
    engine_cpus: set[int] | None = None
    """None: every core, shared."""
    rest_cpus: set[int] | None = None
    """Where sluice, Redis and the load generator run."""


def layout(name: str) -> Layout:
    cores = os.cpu_count() or 1
    if name == "shared":
        return Layout(name, engine_threads=cores)
    assert cores >= 2, "an isolated engine needs a core of its own and one for the rest"
    return Layout(name, engine_threads=1, engine_cpus={0}, rest_cpus=set(range(1, cores)))


def request(topic: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Request {next(_request_ids)}. Write an essay on {topic}."}
        ],
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "top_p": 1,
        "stream_options": {"include_usage": True},
    }


def engine_first_token_ms(system: str, logger: Proc) -> dict[str, float]:
    """Per stream id, the engine's time to first token as `system`'s `logger` process logged
    it (sluice's worker, the proxy)."""
    log = logger.log_text()
    return {m[2]: float(m[1]) for m in FIRST_TOKEN_LOGS[system].finditer(log)}


async def level(
    url: str, n: int, processes: dict[str, psutil.Process], logger: tuple[str, Proc] | None = None
) -> dict[str, Any]:
    """N streams at once, each with a client of its own, and the CPU time each process spent;
    through a gateway (`logger`: its name and the process that logs the engine's first tokens),
    also what the gateway added to each stream's first token."""
    before = common.cpu_seconds(processes)
    timings, wall = await common.concurrent_streams(
        url, [request(TOPICS[i % len(TOPICS)]) for i in range(n)]
    )
    after = common.cpu_seconds(processes)
    ok = [t for t in timings if t.ok and t.tokens > 0]
    result = {
        **common.level_stats(timings, wall),
        "tokens": sum(t.tokens for t in ok),
        "cpu_s": {name: after[name] - before[name] for name in processes},
        "ttfts_ms": [t.ttft_s * 1000 for t in ok],
    }
    if logger is not None:
        ids = {t.headers["x-sluice-stream-id"] for t in ok}
        # A client may read [DONE] before the worker has logged the stream's end.
        wait_until(lambda: ids <= engine_first_token_ms(*logger).keys(), 10, "first-token logs")
        engine = engine_first_token_ms(*logger)
        added = [t.ttft_after_sent_s * 1000 - engine[t.headers["x-sluice-stream-id"]] for t in ok]
        result["added_ms"] = added
        result["added_p50_ms"] = common.median(added)
    return result


async def warm_up(url: str, n: int) -> None:
    """`n` short streams at once: every slot of the engine touched (its first use of one costs
    a second or more), and sluice's first jobs."""
    await common.concurrent_streams(url, [request("warm-up") | {"max_tokens": 8} for _ in range(n)])


def measure(
    place: Layout, levels: list[int], rounds: int, tick: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every level, `rounds` times per system, on a fresh engine and sluice in `place`; `tick`
    after each."""
    binary = llama_server_binary()
    assert binary is not None, "no llama-server: `make llama-server` builds it"
    rows: list[dict[str, Any]] = []
    with common.on_cpus(place.rest_cpus), ExitStack() as run:
        engine = LlamaServer(
            binary, slots=max(levels), threads=place.engine_threads, cpus=place.engine_cpus
        ).start()
        run.callback(engine.stop)
        redis = run.enter_context(common.redis_server())
        stack = run.enter_context(
            common.sluice_stack(
                redis, 1, backend="openai", upstream_url=engine.v1, access_log="false"
            )
        )
        proxy, proxy_url = run.enter_context(proxy_server(engine.v1))
        pids = [engine.pid, stack.api.pid, stack.workers[0].pid, redis.pid, proxy.pid, os.getpid()]
        processes = {name: psutil.Process(pid) for name, pid in zip(PROCESSES, pids, strict=True)}
        urls = {"sluice": stack.base_url, "proxy": proxy_url, "direct": engine.url}
        loggers = {"sluice": ("sluice", stack.workers[0]), "proxy": ("proxy", proxy)}
        for system in SYSTEMS:
            asyncio.run(warm_up(urls[system], max(levels)))
        for n in levels:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
            for r in range(rounds):
                for system in SYSTEMS[r % 3 :] + SYSTEMS[: r % 3]:  # each goes first in turn
                    result = level(urls[system], n, processes, loggers.get(system))
                    runs[system].append(asyncio.run(result))
                    tick(f"upstream {place.name} {n} streams")
            rows += [summarize(place.name, system, n, runs[system]) for system in SYSTEMS]
            rows[-3]["versus_direct"] = versus(runs["sluice"], runs["direct"], runs["proxy"])
    return rows


def proxy_server(upstream: str) -> contextlib.AbstractContextManager[tuple[Proc, str]]:
    """bench/proxy.py in front of `upstream`; its process and URL."""
    return common.anchor_server("bench.proxy", "--upstream", upstream)


def versus(
    mine: list[dict[str, Any]], direct: list[dict[str, Any]], proxy: list[dict[str, Any]]
) -> dict[str, Any]:
    """Sluice against direct, round by round (each pair ran back to back), then the median over
    rounds: the engine's own speed drifts between rounds by more than sluice adds (at 16 streams
    every stream of a round gets its first token in the same prefill batch). Beside it, what the
    proxy adds, per stream, as sluice's own share is taken."""
    pairs = list(zip(mine, direct, strict=True))
    added = {q: [s[f"ttft_{q}_ms"] - d[f"ttft_{q}_ms"] for s, d in pairs] for q in ("p50", "p95")}
    own = [a for s in mine for a in s["added_ms"]]
    proxied = [a for p in proxy for a in p["added_ms"]]
    return {
        "sluice_added_p50_ms": common.median(own),
        "sluice_added_p95_ms": common.pct(own, 95),
        "proxy_added_p50_ms": common.median(proxied),
        "proxy_added_p95_ms": common.pct(proxied, 95),
        "aggregate_sluice_over_direct": common.median(
            [s["aggregate_tokens_per_s"] / d["aggregate_tokens_per_s"] for s, d in pairs]
        ),
        "ttft_added_p50_ms": common.median(added["p50"]),
        "ttft_added_p95_ms": common.median(added["p95"]),
        "ttft_added_p50_ms_by_round": added["p50"],
    }


def summarize(place: str, system: str, n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [t for x in runs for t in x["ttfts_ms"]]
    tokens = sum(x["tokens"] for x in runs)
    mid = sorted(runs, key=lambda x: x["aggregate_tokens_per_s"])[len(runs) // 2]
    return {
        "layout": place,
        "system": system,
        "streams": n,
        "completed": min(x["completed"] for x in runs),
        "aggregate_tokens_per_s": mid["aggregate_tokens_per_s"],
        "ttft_p50_ms": common.median(ttfts),
        "ttft_p95_ms": common.pct(ttfts, 95),
        "cpu_ms_per_token": {
            name: 1000 * sum(x["cpu_s"][name] for x in runs) / max(tokens, 1) for name in PROCESSES
        },
        "first_error": next((x["first_error"] for x in runs if x["first_error"]), ""),
        "rounds": [{k: v for k, v in x.items() if k not in ("ttfts_ms", "added_ms")} for x in runs],
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per layout and level: sluice's aggregate over direct's, and the TTFT it adds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if "versus_direct" in row:
            out.setdefault(row["layout"], {})[str(row["streams"])] = row["versus_direct"]
    return out


def goals(summed: dict[str, dict[str, dict[str, Any]]]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for place, levels in summed.items():
        for n, s in levels.items():
            out[f"{place}_{n}_streams_aggregate_at_least_0.9x_direct"] = (
                s["aggregate_sluice_over_direct"] >= 0.9
            )
            out[f"{place}_{n}_streams_ttft_added_p50_at_most_10ms"] = s["sluice_added_p50_ms"] <= 10
    return out


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    groups = sorted(
        {(r["layout"], r["streams"]) for r in rows}, key=lambda g: (LAYOUTS.index(g[0]), g[1])
    )
    width = 0.27
    for i, system in enumerate(SYSTEMS):
        mine = {(r["layout"], r["streams"]): r for r in rows if r["system"] == system}
        x = [j + (i - 1) * width for j in range(len(groups))]
        for ax, key in zip(axes, ["aggregate_tokens_per_s", "ttft_p50_ms"], strict=True):
            ax.bar(x, [mine[g][key] for g in groups], width, label=system)
    for ax, title in zip(
        axes, ["aggregate tokens/s", "time to first token, p50 (ms)"], strict=True
    ):
        ax.set_xticks(range(len(groups)), [f"{place}\n{n} streams" for place, n in groups])
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.suptitle(
        f"sluice → llama-server vs a bare proxy vs llama-server, SmolLM2-135M Q4_1, "
        f"{os.cpu_count()} cores "
        f"(shared: all for all; isolated: the engine alone on one, with one thread), "
        f"greedy, max_tokens {MAX_TOKENS}",
        y=1.03,
        fontsize="medium",
    )
    return fig


def main() -> None:
    parser = common.sweep_arguments(__doc__, levels="4,16", rounds=6)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    places = [layout(name) for name in args.layouts.split(",")]
    levels: list[int] = args.levels
    done, total = itertools.count(1), len(places) * len(levels) * args.rounds * len(SYSTEMS)

    def tick(label: str) -> None:
        common.progress(next(done), total, label)

    rows = [row for place in places for row in measure(place, levels, args.rounds, tick)]
    summed = summary(rows)
    result = {"rows": rows, "summary": summed, "goals": goals(summed)}
    common.save("upstream", {"rounds": args.rounds, "max_tokens": MAX_TOKENS, **result}, plot(rows))
    columns = ["layout", "system", "streams", "completed", "aggregate_tokens_per_s"]
    print(common.table(rows, [*columns, "ttft_p50_ms", "ttft_p95_ms"]))
    cpu = [{**r, **{f"{k}_ms": v for k, v in r["cpu_ms_per_token"].items()}} for r in rows]
    print("CPU time per token generated (ms), by process:")
    print(common.table(cpu, ["layout", "system", "streams", *(f"{k}_ms" for k in PROCESSES)]))
    print(json.dumps({"summary": summed, "goals": result["goals"]}, indent=2))


if __name__ == "__main__":
    main()
