"""sluice side by side with its peer and its ceiling, on the same GGUF and thread count:

  sluice      `sluice api` + one `sluice worker` (queue, Redis Stream, relay)
  peer        llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`)
  ceiling     llama-cpp-python in this process, no HTTP at all

Each request is the OpenAI chat format with the seed's prompts, greedy (temperature 0) and
max_tokens 256, so every system generates the same tokens; systems take turns, prompt by prompt.

    python -m bench.peers [--runs 6]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import llama_cpp

from bench.common import (
    Timing,
    median,
    pct,
    progress,
    pyplot,
    redis_server,
    save,
    sluice_stack,
    table,
    timed_stream,
)
from bench.seed_acceptance import SEED_PROMPTS
from shared.settings import Settings
from tests.procs import Proc, answers, free_port, wait_until

MAX_TOKENS = 256
SYSTEMS = ["sluice", "peer", "ceiling"]


def request(prompt: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }


@contextmanager
def peer_server(settings: Settings) -> Iterator[str]:
    port = free_port()
    server = Proc(
        "bench-llama-cpp-server",
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(settings.gguf_path),
            "--n_threads",
            str(settings.n_threads),
            "--n_ctx",
            str(settings.n_ctx),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    ).start()
    url = f"http://127.0.0.1:{port}"

    try:
        wait_until(lambda: answers(f"{url}/v1/models"), 120, "llama_cpp.server")
        yield url
    finally:
        server.stop()


def in_process(llm: llama_cpp.Llama, prompt: str, repeat_penalty: float) -> Timing:
    """The ceiling: the same generation with no queue, no Redis and no HTTP."""
    timing = Timing()
    start = time.perf_counter()
    body = request(prompt)
    for chunk in llm.create_chat_completion(
        messages=body["messages"],
        stream=True,
        max_tokens=MAX_TOKENS,
        temperature=0,
        repeat_penalty=repeat_penalty,
    ):
        text = chunk["choices"][0]["delta"].get("content")  # type: ignore[index]
        if text:
            timing.record(text, start)
    timing.total_s = time.perf_counter() - start
    timing.ok = True
    return timing


async def measure(
    urls: dict[str, str], ceiling: Callable[[str], Timing], runs: int
) -> dict[str, list[Timing]]:
    timings: dict[str, list[Timing]] = {s: [] for s in SYSTEMS}
    total = runs * len(SEED_PROMPTS) * len(SYSTEMS)
    async with httpx.AsyncClient(timeout=300) as client:
        for url in urls.values():  # warm-up: load pages, fill caches
            await timed_stream(client, f"{url}/v1/chat/completions", request("Hello"))
        ceiling("Hello")
        for _ in range(runs):
            for prompt in SEED_PROMPTS:
                for name in SYSTEMS:
                    if name == "ceiling":
                        timing = ceiling(prompt)
                    else:
                        timing = await timed_stream(
                            client, f"{urls[name]}/v1/chat/completions", request(prompt)
                        )
                    timings[name].append(timing)
                    progress(sum(map(len, timings.values())), total, "sluice / peer / ceiling")
    return timings


def report(timings: dict[str, list[Timing]]) -> dict[str, Any]:
    rows = []
    for name, runs in timings.items():
        ttft = [t.ttft_s * 1000 for t in runs if t.ok]
        rate = [t.tokens_per_s for t in runs if t.ok]
        rows.append(
            {
                "system": name,
                "ok": sum(t.ok for t in runs),
                "runs": len(runs),
                "ttft_p50_ms": median(ttft),
                "ttft_p95_ms": pct(ttft, 95),
                "tokens_per_s_p50": median(rate),
                "chars_p50": median([t.chars for t in runs]),
            }
        )
    by = {r["system"]: r for r in rows}
    ratios = {
        "tokens_per_s_sluice_over_peer": by["sluice"]["tokens_per_s_p50"]
        / by["peer"]["tokens_per_s_p50"],
        "tokens_per_s_sluice_over_ceiling": by["sluice"]["tokens_per_s_p50"]
        / by["ceiling"]["tokens_per_s_p50"],
        "ttft_p50_ms_sluice_minus_peer": by["sluice"]["ttft_p50_ms"] - by["peer"]["ttft_p50_ms"],
        "ttft_p50_ms_sluice_minus_ceiling": by["sluice"]["ttft_p50_ms"]
        - by["ceiling"]["ttft_p50_ms"],
    }
    goals = {
        "tokens_per_s_at_least_peer": ratios["tokens_per_s_sluice_over_peer"] >= 0.98,
        "ttft_within_20ms_of_peer": ratios["ttft_p50_ms_sluice_minus_peer"] <= 20,
    }
    return {"systems": rows, "ratios": ratios, "goals": goals}


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["system"] for r in rows]
    left.bar(names, [r["tokens_per_s_p50"] for r in rows], color=["#2a7", "#888", "#bbb"])
    left.set_title("decode speed (tokens/s, p50)")
    right.bar(names, [r["ttft_p50_ms"] for r in rows], color=["#2a7", "#888", "#bbb"])
    right.errorbar(
        names,
        [r["ttft_p50_ms"] for r in rows],
        yerr=[[0] * len(rows), [r["ttft_p95_ms"] - r["ttft_p50_ms"] for r in rows]],
        fmt="none",
        ecolor="k",
        capsize=4,
    )
    right.set_title("time to first token (ms, p50 to p95)")
    fig.suptitle(f"SmolLM2-135M Q4_1, {os.cpu_count()} cores, greedy, max_tokens {MAX_TOKENS}")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6)  # 18 requests per system: runs differ by ~5%
    args = parser.parse_args()
    settings = Settings(backend="llama")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        urls = {
            "sluice": stack.enter_context(sluice_stack(redis, 1, backend="llama")).base_url,
            "peer": stack.enter_context(peer_server(settings)),
        }
        llm = llama_cpp.Llama(
            model_path=str(settings.gguf_path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            verbose=False,
        )
        ceiling = functools.partial(in_process, llm, repeat_penalty=settings.repeat_penalty)
        result = report(asyncio.run(measure(urls, ceiling, args.runs)))
        llm.close()
    save("peers", result, plot(result["systems"]))
    print(table(result["systems"], list(result["systems"][0])))
    print(result["ratios"])
    print(result["goals"])


if __name__ == "__main__":
    main()
