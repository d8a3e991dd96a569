"""What sluice costs in front of an engine (issue 15): the same streams through sluice to
llama-server and straight to llama-server, at 4 and 16 at once, in one run.

  through sluice   `sluice api` + one `sluice worker` with SLUICE_BACKEND=openai, whose upstream is
                   the llama-server below
  direct           the same llama-server (`-np 16`), asked directly

llama.cpp's own server on the bundled GGUF (SmolLM2-135M Q4_1), built by deploy/llama-server.sh,
with every core. Each request: the chat format, greedy, max_tokens 128, a prompt of its own (a
request number first, so no stream answers from another's cached prompt). The two take turns,
`--rounds` times per level, in alternating order. Per level: aggregate tokens/s (every stream's
tokens, as the engine counts them, over the time from the first request to the last end) and time
to first token, p50/p95, for each; then sluice's aggregate over direct's (median over rounds) and
the time to first token sluice adds (p50 and p95 of all rounds' streams). Goals: at least 0.9x
the aggregate, at most 10 ms added at the median.

    python -m bench.upstream [--levels 4,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from contextlib import ExitStack
from typing import Any

import httpx

from bench.common import median, pct, progress, pyplot, redis_server, save, sluice_stack, table
from bench.common import timed_stream as timed
from tests.upstreams import LlamaServer, llama_server_binary

MAX_TOKENS = 128
SYSTEMS = ["sluice", "direct"]
TOPICS = ["the ocean", "volcanoes", "photosynthesis", "jazz", "chess", "honey bees", "the moon"]
_request_ids = itertools.count(1)


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


async def level(url: str, n: int) -> dict[str, Any]:
    """N streams at once, each with a client of its own."""

    async def one(i: int) -> Any:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await timed(client, "/v1/chat/completions", request(TOPICS[i % len(TOPICS)]))

    start = time.perf_counter()
    timings = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    ok = [t for t in timings if t.ok and t.completion_tokens]
    return {
        "streams": n,
        "completed": len(ok),
        "aggregate_tokens_per_s": sum(t.completion_tokens for t in ok) / wall,
        "ttfts_ms": [t.ttft_s * 1000 for t in ok],
        "first_error": next((t.error or "ended early" for t in timings if not t.ok), ""),
    }


def sweep(levels: list[int], rounds: int) -> dict[str, Any]:
    binary = llama_server_binary()
    assert binary is not None, "no llama-server: `make llama-server` builds it"
    threads = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    summary: dict[int, dict[str, float]] = {}
    done, total = 0, len(levels) * rounds * len(SYSTEMS)
    with ExitStack() as run:
        engine = LlamaServer(binary, slots=max(levels), threads=threads).start()
        run.callback(engine.stop)
        redis = run.enter_context(redis_server())
        stack = run.enter_context(
            sluice_stack(redis, 1, backend="openai", upstream_url=engine.v1, access_log="false")
        )
        urls = {"sluice": stack.base_url, "direct": engine.url}
        for system in SYSTEMS:  # warm both: the engine's first prompts, sluice's first job
            asyncio.run(level(urls[system], 2))
        for n in levels:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
            for r in range(rounds):
                for system in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
                    runs[system].append(asyncio.run(level(urls[system], n)))
                    done += 1
                    progress(done, total, f"upstream {n} streams")
            for system in SYSTEMS:
                ttfts = [t for x in runs[system] for t in x["ttfts_ms"]]
                mid = sorted(runs[system], key=lambda x: x["aggregate_tokens_per_s"])[rounds // 2]
                rows.append(
                    {
                        "system": system,
                        "streams": n,
                        "completed": min(x["completed"] for x in runs[system]),
                        "aggregate_tokens_per_s": mid["aggregate_tokens_per_s"],
                        "ttft_p50_ms": median(ttfts),
                        "ttft_p95_ms": pct(ttfts, 95),
                        "first_error": next((x["first_error"] for x in runs[system]), ""),
                        "rounds": [
                            {k: v for k, v in x.items() if k != "ttfts_ms"} for x in runs[system]
                        ],
                    }
                )
            mine, direct = rows[-2], rows[-1]
            summary[n] = {
                "aggregate_sluice_over_direct": median(
                    [
                        s["aggregate_tokens_per_s"] / d["aggregate_tokens_per_s"]
                        for s, d in zip(runs["sluice"], runs["direct"], strict=True)
                    ]
                ),
                "ttft_added_p50_ms": mine["ttft_p50_ms"] - direct["ttft_p50_ms"],
                "ttft_added_p95_ms": mine["ttft_p95_ms"] - direct["ttft_p95_ms"],
            }
    return {"rows": rows, "summary": summary}


def goals(summary: dict[int, dict[str, float]]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for n, s in summary.items():
        out[f"{n}_streams_aggregate_at_least_0.9x_direct"] = (
            s["aggregate_sluice_over_direct"] >= 0.9
        )
        out[f"{n}_streams_ttft_added_p50_at_most_10ms"] = s["ttft_added_p50_ms"] <= 10
    return out


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    levels = sorted({r["streams"] for r in rows})
    width = 0.38
    for i, system in enumerate(SYSTEMS):
        mine = {r["streams"]: r for r in rows if r["system"] == system}
        x = [j + (i - 0.5) * width for j in range(len(levels))]
        axes[0].bar(x, [mine[n]["aggregate_tokens_per_s"] for n in levels], width, label=system)
        axes[1].bar(x, [mine[n]["ttft_p50_ms"] for n in levels], width, label=system)
    titles = ["aggregate tokens/s", "time to first token, p50 (ms)"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(levels)), [f"{n} streams" for n in levels])
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.suptitle(
        f"sluice → llama-server vs llama-server, SmolLM2-135M Q4_1, {os.cpu_count()} cores, "
        f"greedy, max_tokens {MAX_TOKENS}",
        y=1.03,
    )
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="4,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = sweep([int(n) for n in args.levels.split(",")], args.rounds)
    result["goals"] = goals(result["summary"])
    save(
        "upstream",
        {"rounds": args.rounds, "max_tokens": MAX_TOKENS, **result},
        plot(result["rows"]),
    )
    columns = ["system", "streams", "completed", "aggregate_tokens_per_s", "ttft_p50_ms"]
    print(table(result["rows"], [*columns, "ttft_p95_ms"]))
    print(json.dumps({"summary": result["summary"], "goals": result["goals"]}, indent=2))


if __name__ == "__main__":
    main()
