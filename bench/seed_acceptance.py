"""The seed's bars on the real model: time to first token < 2401 ms, > 29 tokens/s,
> 1375 characters, >= 6 chunks, judged on the worst of several runs of the seed's own prompts.

    python -m bench.seed_acceptance [--url http://127.0.0.1:8080] [--runs 3]

Without --url it starts its own Redis, `sluice api` and one `sluice worker` (real model).
Prints JSON and writes bench/results/seed_acceptance.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import ExitStack
from typing import Any

import httpx

from bench.common import (
    Timing,
    median,
    progress,
    pyplot,
    redis_server,
    save,
    sluice_stack,
    timed_stream,
)

SEED_PROMPTS = ["Explain streaming APIs", "Your prompt", "Your prompt text here"]
THRESHOLDS = {"ttft_ms": 2401, "tokens_per_s": 29, "chars": 1375, "chunks": 6}
BARS = {
    "ttft_under_2401ms": lambda worst: worst["ttft_ms"] < 2401,
    "over_29_tokens_per_s": lambda worst: worst["tokens_per_s"] > 29,
    "over_1375_chars": lambda worst: worst["chars"] > 1375,
    "at_least_6_chunks": lambda worst: worst["chunks"] >= 6,
}


async def measure(url: str, runs: int) -> list[tuple[str, Timing]]:
    results = []
    total = runs * len(SEED_PROMPTS)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for n in range(runs):
            for prompt in SEED_PROMPTS:
                body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
                results.append((prompt, await timed_stream(client, "/v1/chat/completions", body)))
                progress(len(results), total, f"seed run {n + 1}/{runs}")
    return results


def summarize(results: list[tuple[str, Timing]]) -> dict[str, Any]:
    rows = [{"prompt": p, **t.summary(), "ttft_ms": t.ttft_s * 1000} for p, t in results]
    figures = {
        "ttft_ms": [r["ttft_ms"] for r in rows],
        "tokens_per_s": [r["tokens_per_s"] for r in rows],
        "chars": [r["chars"] for r in rows],
        "chunks": [r["chunks"] for r in rows],
    }
    worst = {
        "ttft_ms": max(figures["ttft_ms"]),
        "tokens_per_s": min(figures["tokens_per_s"]),
        "chars": min(figures["chars"]),
        "chunks": min(figures["chunks"]),
    }
    bars = {name: bool(check(worst)) and all(r["ok"] for r in rows) for name, check in BARS.items()}
    return {
        "runs": rows,
        "summary": {k: {"median": median(v), "worst": worst[k]} for k, v in figures.items()},
        "bars": {**bars, "all": all(bars.values())},
    }


def plot(report: dict[str, Any]) -> Any:
    """Every run against each bar (the dashed line)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    titles = ["time to first token (ms)", "tokens/s", "characters", "chunks"]
    for ax, (figure, bar), title in zip(axes, THRESHOLDS.items(), titles, strict=True):
        values = [run[figure] for run in report["runs"]]
        ax.plot(range(1, len(values) + 1), values, "o")
        ax.axhline(bar, linestyle="--", color="r")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("run")
        ax.set_title(title)
    fig.suptitle("the seed's bars (dashed) and every run, on the real model", y=1.04)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running sluice; default: start one")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.url
        if url is None:
            redis = stack.enter_context(redis_server())
            url = stack.enter_context(sluice_stack(redis, 1, backend="llama")).base_url
        report = {"url": url, **summarize(asyncio.run(measure(url, args.runs)))}
    save("seed_acceptance", report, plot(report))
    print(json.dumps({k: report[k] for k in ("summary", "bars")}, indent=2))


if __name__ == "__main__":
    main()
