"""Continuous batching on the real model, side by side at 1 to 16 concurrent streams (issue 14):

  sluice             `sluice api` + one `sluice worker` with SLUICE_WORKER_MAX_JOBS = N
  llama-server       llama.cpp's own server, `-np N -c <N * SLUICE_N_CTX>`, built from the
                     llama.cpp inside the llama-cpp-python sdist we pin (deploy/llama-server.sh)
  llama-cpp-python   its own OpenAI server (`python -m llama_cpp.server`, as bench/peers.py)

Same GGUF, same threads, greedy, repeat penalty 1.1, max_tokens 128. Every request has a prompt
of its own (a request number first, then a topic), so no server answers from a cached prompt
beyond the chat template's shared head. At each level sluice and llama-server are started with
N sequences; then the three take turns, `--rounds` times, in alternating order. Per system and
level (the median round by aggregate tokens/s): streams completed, aggregate tokens/s (every
stream's tokens over the time from the first request to the last end), per-stream tokens/s p50
(first token to last), time to first token p50/p95, and the server's RSS. Then, on sluice:
whether a greedy answer is the same alone and inside a batch of 8.

The structured arm (`--structured`, issue 22) runs instead at 1 and 8 streams: sluice and
llama-server each answer the same requests as plain text and under the same JSON-schema
`response_format` (`ESSAY`: a title and paragraphs of free text, so every answer runs to
`max_tokens` under the grammar), taking turns in one run. It reports sluice's aggregate tokens/s
under grammar over llama-server's, and what the grammar costs each (constrained over plain).

With `--sampling`, instead, what issue 28's parameters cost on sluice alone (one worker, 8
sequences; greedy, 128 tokens per answer, none ending early; the arms take turns, `--rounds`
times, the median round shown): 8 streams plain vs 8 with `logprobs` and `top_logprobs=5`; 4
concurrent streams of one prompt vs one request for `n=4` of it (a prompt new to every round),
by aggregate tokens/s and by when every answer has its first token; and one stream of it alone,
the first-token time `n=4` is held to. Ratios are taken within each round, then their median.

    python -m bench.batching [--levels 1,2,4,8,16] [--rounds 3]
    python -m bench.batching --sampling [--rounds 3] [--threads N]
    python -m bench.batching --structured [--rounds 3] [--threads N]
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import common
from bench.peers import peer_server
from shared.settings import Settings
from tests.procs import RedisServer
from tests.upstreams import LlamaServer, llama_server_binary

MAX_TOKENS = 128
SYSTEMS = ["sluice", "llama-server", "llama-cpp-python"]
TOPICS = [
    "the ocean",
    "volcanoes",
    "the Roman empire",
    "photosynthesis",
    "jazz music",
    "chess",
    "honey bees",
    "the moon",
    "bicycles",
    "coffee",
    "glaciers",
    "the printing press",
    "electric cars",
    "penguins",
    "tea",
    "rainbows",
]
_request_ids = itertools.count(1)


ESSAY = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "paragraphs": {"type": "array", "items": {"type": "string"}, "minItems": 3},
    },
    "required": ["title", "paragraphs"],
    "additionalProperties": False,
}
STRUCTURED_LEVELS = [1, 8]
GRAMMAR = "+grammar"
"""A system's name under the structured arm's JSON schema."""


def request(topic: str, unique: bool = True, structured: bool = False) -> dict[str, Any]:
    prefix = f"Request {next(_request_ids)}. " if unique else ""
    if structured:
        return request(topic, unique) | {
            "messages": [
                {"role": "user", "content": f"{prefix}Write a long essay about {topic}, as JSON."}
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "essay", "schema": ESSAY},
            },
        }
    return {
        "messages": [{"role": "user", "content": f"{prefix}Write a long essay about {topic}."}],
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "repeat_penalty": 1.1,  # sluice's SLUICE_REPEAT_PENALTY and llama_cpp.server's default
        "stream_options": {"include_usage": True},
    }


@dataclass(frozen=True)
class Target:
    system: str
    url: str
    pid: int
    """The process that holds the model (sluice: its worker), for its RSS."""


async def level(target: Target, n: int, structured: bool = False) -> dict[str, Any]:
    """N streams at once, each with a client of its own (see bench/concurrency.py); with the
    CPU time the model's process spent per token, which the machine's other load moves far
    less than it moves the time taken."""
    model = psutil.Process(target.pid)
    cpu_before = common.process_cpu_s(model)
    timings, wall = await common.concurrent_streams(
        target.url, [request(TOPICS[i], structured=structured) for i in range(n)]
    )
    cpu_s = common.process_cpu_s(model) - cpu_before
    ok = [t for t in timings if t.ok and t.tokens > 0]
    return {
        "system": target.system + (GRAMMAR if structured else ""),
        **common.level_stats(timings, wall),
        "per_stream_tokens_per_s_p50": common.median([t.tokens_per_s for t in ok]),
        "tokens_p50": common.median([t.tokens for t in ok]),
        "cpu_ms_per_token": 1000 * cpu_s / max(1, sum(t.tokens for t in ok)),
    }


async def warm_up(targets: list[Target]) -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        for target in targets:
            await common.timed_stream(
                client, f"{target.url}/v1/chat/completions", request("warm-up")
            )


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def answers(url: str, topics: list[str]) -> tuple[list[str], list[str]]:
    """Each topic's greedy answer alone (one at a time), then all of them at once."""

    async def one(topic: str) -> str:
        async with httpx.AsyncClient(base_url=url, timeout=900) as client:
            body = {**request(topic, unique=False), "stream": False}
            response = await client.post("/v1/chat/completions", json=body)
            text: str = response.json()["choices"][0]["message"]["content"]
            return text

    alone = [await one(t) for t in topics]
    together = await asyncio.gather(*(one(t) for t in topics))
    return alone, list(together)


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def identity(alone: list[str], together: list[str]) -> dict[str, Any]:
    """How far each batched answer agrees with the same prompt's answer alone."""
    agree = [common_prefix(a, b) for a, b in zip(alone, together, strict=True)]
    return {
        "answers": len(alone),
        "identical": sum(a == b for a, b in zip(alone, together, strict=True)),
        "chars_alone": [len(a) for a in alone],
        "common_prefix_chars": agree,
    }


@contextmanager
def batched_servers(
    redis: RedisServer, db: int, n: int, settings: Settings, binary: Path, threads: int
) -> Iterator[tuple[Target, Target]]:
    """sluice (one worker decoding N sequences, on database `db`) and llama-server (N slots),
    same GGUF, llama.cpp on `threads` threads, started and warmed up."""
    with common.sluice_stack(
        redis,
        1,
        db=db,
        backend="llama",
        worker_max_jobs=str(n),
        n_threads=str(threads),
        access_log="false",
    ) as stack:
        anchor = LlamaServer(
            binary,
            slots=n,
            threads=threads,
            ctx_per_slot=settings.n_ctx,
            model=settings.gguf_path,
        ).start()
        try:
            targets = (
                Target("sluice", stack.base_url, stack.workers[0].pid),
                Target("llama-server", anchor.url, anchor.pid),
            )
            asyncio.run(warm_up(list(targets)))
            yield targets
        finally:
            anchor.stop()


def sweep(levels: list[int], rounds: int) -> dict[str, Any]:
    settings = Settings(backend="llama")
    binary = llama_server_binary()
    assert binary is not None, "no llama-server: `make llama-server` builds it"
    rows: list[dict[str, Any]] = []
    ratios: dict[int, dict[str, float]] = {}
    checks: dict[str, Any] = {}
    done, total = 0, len(levels) * rounds * len(SYSTEMS)
    with ExitStack() as run:
        redis = run.enter_context(common.redis_server())
        peer_url = run.enter_context(peer_server(settings))
        peer_pid = next(
            p.pid
            for p in psutil.Process().children()
            if "llama_cpp.server" in " ".join(p.cmdline())
        )
        peer = Target("llama-cpp-python", peer_url, peer_pid)
        asyncio.run(warm_up([peer]))
        for db, n in enumerate(levels, start=1):
            with batched_servers(redis, db, n, settings, binary, settings.n_threads) as (
                ours,
                anchor,
            ):
                targets = [ours, anchor, peer]
                runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
                for r in range(rounds):
                    for target in targets if r % 2 == 0 else targets[::-1]:
                        row = asyncio.run(level(target, n))
                        runs[target.system].append({**row, "round": r})
                        done += 1
                        common.progress(done, total, f"batching {n} streams")
                for target in targets:
                    mine = sorted(runs[target.system], key=lambda x: x["aggregate_tokens_per_s"])
                    rows.append(
                        {**mine[len(mine) // 2], "rss_mb": rss_mb(target.pid), "rounds": mine}
                    )
                by_round = [
                    {row["system"]: row for row in (runs[s][r] for s in SYSTEMS)}
                    for r in range(rounds)
                ]
                ratios[n] = {
                    "aggregate_sluice_over_llama_server": common.median(
                        [
                            x["sluice"]["aggregate_tokens_per_s"]
                            / x["llama-server"]["aggregate_tokens_per_s"]
                            for x in by_round
                        ]
                    ),
                    "per_stream_sluice_over_llama_cpp_python": common.median(
                        [
                            x["sluice"]["per_stream_tokens_per_s_p50"]
                            / x["llama-cpp-python"]["per_stream_tokens_per_s_p50"]
                            for x in by_round
                        ]
                    ),
                }
                if n == 8:
                    for target in targets[:2]:
                        checks[target.system] = identity(
                            *asyncio.run(answers(target.url, TOPICS[:8]))
                        )
    return {"rows": rows, "ratios": ratios, "greedy_alone_vs_batch_of_8": checks}


def structured_sweep(rounds: int, threads: int) -> dict[str, Any]:
    """The structured arm: at 1 and 8 streams, sluice and llama-server, plain and under the
    same JSON schema, taking turns `rounds` times in alternating order."""
    settings = Settings(backend="llama")
    binary = llama_server_binary()
    assert binary is not None, "no llama-server: `make llama-server` builds it"
    # The two arms each ratio compares run back to back, in either order (the machine's other
    # load drifts between arms): sluice, sluice+grammar, llama-server+grammar, llama-server.
    arms = [("sluice", False), ("sluice", True), ("llama-server", True), ("llama-server", False)]
    rows: list[dict[str, Any]] = []
    ratios: dict[int, dict[str, float]] = {}
    done, total = 0, len(STRUCTURED_LEVELS) * rounds * len(arms)
    with common.redis_server() as redis:
        for db, n in enumerate(STRUCTURED_LEVELS, start=1):
            with batched_servers(redis, db, n, settings, binary, threads) as (ours, anchor):
                targets = {"sluice": ours, "llama-server": anchor}
                runs: dict[str, list[dict[str, Any]]] = {}
                for r in range(rounds):
                    for system, structured in arms if r % 2 == 0 else arms[::-1]:
                        row = asyncio.run(level(targets[system], n, structured))
                        runs.setdefault(row["system"], []).append({**row, "round": r})
                        done += 1
                        common.progress(done, total, f"structured {n} streams")
                for name, mine in runs.items():
                    ranked = sorted(mine, key=lambda x: x["aggregate_tokens_per_s"])
                    rss = rss_mb(targets[name.removesuffix(GRAMMAR)].pid)
                    rows.append({**ranked[len(ranked) // 2], "rss_mb": rss, "rounds": mine})
                ratios[n] = {
                    "grammar_sluice_over_llama_server": per_round(
                        runs, "sluice" + GRAMMAR, "llama-server" + GRAMMAR
                    ),
                    "sluice_grammar_over_plain": per_round(runs, "sluice" + GRAMMAR, "sluice"),
                    "llama_server_grammar_over_plain": per_round(
                        runs, "llama-server" + GRAMMAR, "llama-server"
                    ),
                    "cpu_per_token_sluice_grammar_over_plain": per_round(
                        runs, "sluice" + GRAMMAR, "sluice", "cpu_ms_per_token"
                    ),
                    "cpu_per_token_sluice_grammar_over_llama_server_grammar": per_round(
                        runs, "sluice" + GRAMMAR, "llama-server" + GRAMMAR, "cpu_ms_per_token"
                    ),
                }
    return {"rows": rows, "ratios": ratios}


def per_round(
    runs: dict[str, list[dict[str, Any]]], a: str, b: str, measure: str = "aggregate_tokens_per_s"
) -> float:
    """The median over rounds of `a`'s `measure` over `b`'s in the same round."""
    return common.median([x[measure] / y[measure] for x, y in zip(runs[a], runs[b], strict=True)])


def structured_goals(result: dict[str, Any]) -> dict[str, bool]:
    at_8 = result["ratios"][8]
    return {
        "8_streams_grammar_at_least_0.9x_llama_server": at_8["grammar_sluice_over_llama_server"]
        >= 0.9,
        "grammar_costs_sluice_at_most_25%": all(
            r["sluice_grammar_over_plain"] >= 0.75 for r in result["ratios"].values()
        ),
    }


def goals(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals, where the sweep has the levels they name."""
    by = {(r["system"], r["streams"]): r for r in result["rows"]}
    out: dict[str, bool] = {}
    if ("sluice", 8) in by:
        sluice, anchor = by["sluice", 8], by["llama-server", 8]
        out["8_streams_aggregate_at_least_llama_server"] = (
            result["ratios"][8]["aggregate_sluice_over_llama_server"] >= 1.0
        )
        out["8_streams_ttft_p50_within_1.5x_llama_server_plus_200ms"] = (
            sluice["ttft_p50_ms"] <= 1.5 * anchor["ttft_p50_ms"] + 200
        )
        out["8_streams_all_complete"] = sluice["completed"] == 8
    if ("sluice", 1) in by:
        out["1_stream_decode_at_least_0.95x_llama_cpp_python"] = (
            result["ratios"][1]["per_stream_sluice_over_llama_cpp_python"] >= 0.95
        )
    return out


def plot(rows: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [
        ("aggregate_tokens_per_s", "aggregate tokens/s"),
        ("per_stream_tokens_per_s_p50", "per-stream tokens/s (p50, completed streams)"),
        ("ttft_p50_ms", "time to first token, p50 (ms)"),
    ]
    for system, style in zip(SYSTEMS, ("o-", "s--", "^:"), strict=True):
        mine = [r for r in rows if r["system"] == system]
        x = [r["streams"] for r in mine]
        dropped = any(r["completed"] < r["streams"] for r in mine)
        label = f"{system} (drops streams)" if dropped else system
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot(x, [r[key] for r in mine], style, label=label)
    levels = sorted({r["streams"] for r in rows})
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        if key == "ttft_p50_ms":
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.suptitle(
        f"SmolLM2-135M Q4_1, {os.cpu_count()} cores, greedy, max_tokens {MAX_TOKENS}; "
        "sluice and llama-server with one sequence per stream",
        y=1.03,
    )
    return fig


COLUMNS = [
    "system",
    "streams",
    "completed",
    "aggregate_tokens_per_s",
    "per_stream_tokens_per_s_p50",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "tokens_p50",
    "cpu_ms_per_token",
    "rss_mb",
]


def plot_structured(rows: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = ["sluice", "sluice" + GRAMMAR, "llama-server", "llama-server" + GRAMMAR]
    width = 0.2
    for k, name in enumerate(names):
        mine = {r["streams"]: r["aggregate_tokens_per_s"] for r in rows if r["system"] == name}
        x = [i + (k - 1.5) * width for i in range(len(STRUCTURED_LEVELS))]
        ax.bar(x, [mine.get(n, 0) for n in STRUCTURED_LEVELS], width, label=name)
    ax.set_xticks(range(len(STRUCTURED_LEVELS)), [f"{n} streams" for n in STRUCTURED_LEVELS])
    ax.set_ylabel("aggregate tokens/s")
    ax.legend(fontsize="small")
    ax.set_title(
        f"Under a JSON-schema grammar: SmolLM2-135M Q4_1, {os.cpu_count()} cores, greedy, "
        f"max_tokens {MAX_TOKENS}",
        fontsize="medium",
    )
    return fig


def main_structured(rounds: int, threads: int) -> None:
    result = structured_sweep(rounds, threads)
    result["goals"] = structured_goals(result)
    common.save(
        "batching_structured",
        {"rounds": rounds, "threads": threads, "max_tokens": MAX_TOKENS, "schema": ESSAY, **result},
        plot_structured(result["rows"]),
    )
    print(common.table(result["rows"], COLUMNS))
    print(result["ratios"])
    print(result["goals"])


SAMPLING_STREAMS = 8
CHOICES = 4
ARMS = ["8 streams", "8 streams, top_logprobs=5", "4 streams, one prompt", "n=4", "1 stream"]


def full_length(body: dict[str, Any]) -> dict[str, Any]:
    """Every answer exactly `MAX_TOKENS` long: arms compare equal work."""
    return body | {"min_tokens": MAX_TOKENS}


def arm_bodies(arm: str, round_number: int) -> list[dict[str, Any]]:
    if arm.startswith("8 streams"):
        bodies = [full_length(request(TOPICS[i])) for i in range(SAMPLING_STREAMS)]
        if "top_logprobs" in arm:
            return [b | {"logprobs": True, "top_logprobs": 5} for b in bodies]
        return bodies
    # A prompt of the same length for each arm and round, new to the worker's cache but for
    # the chat template's head: no arm answers from another's cached prompt.
    part = f"part {round_number}-{ARMS.index(arm)}"
    shared = full_length(request(f"{TOPICS[round_number % len(TOPICS)]}, {part}"))
    if arm == "n=4":
        return [shared | {"n": CHOICES}]
    return [shared] * (CHOICES if arm.startswith("4 streams") else 1)


async def run_arm(url: str, arm: str, round_number: int) -> dict[str, Any]:
    timings, wall = await common.concurrent_streams(url, arm_bodies(arm, round_number))
    ok = [t for t in timings if t.ok]
    firsts = [first for t in ok for first in t.first_by_choice_s.values()]
    return {
        "arm": arm,
        "round": round_number,
        "answers": len(firsts),
        "completed": len(ok) == len(timings),
        "tokens": sum(t.tokens for t in ok),
        "aggregate_tokens_per_s": sum(t.tokens for t in ok) / wall,
        "first_token_ms": min(firsts) * 1000 if firsts else float("nan"),
        "every_first_token_ms": max(firsts) * 1000 if firsts else float("nan"),
        "wall_s": wall,
    }


def sampling(rounds: int, threads: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with (
        common.redis_server() as redis,
        common.sluice_stack(
            redis,
            1,
            db=1,
            backend="llama",
            worker_max_jobs=str(SAMPLING_STREAMS),
            n_threads=str(threads),
            access_log="false",
        ) as stack,
    ):
        asyncio.run(warm_up([Target("sluice", stack.base_url, stack.workers[0].pid)]))
        for r in range(rounds):
            for n, arm in enumerate(ARMS if r % 2 == 0 else ARMS[::-1]):
                rows.append(asyncio.run(run_arm(stack.base_url, arm, r)))
                common.progress(r * len(ARMS) + n + 1, rounds * len(ARMS), "sampling arms")
    medians = {}
    for arm in ARMS:
        mine = sorted((row for row in rows if row["arm"] == arm), key=_by_tokens_per_s)
        medians[arm] = mine[len(mine) // 2]

    def ratio(over: str, under: str, key: str) -> float:
        per_round = [
            next(a for a in rows if a["arm"] == over and a["round"] == r)[key]
            / next(b for b in rows if b["arm"] == under and b["round"] == r)[key]
            for r in range(rounds)
        ]
        return common.median(per_round)

    ratios = {
        "top_logprobs_5_over_plain_tokens_per_s": ratio(ARMS[1], ARMS[0], "aggregate_tokens_per_s"),
        "n4_over_4_streams_tokens_per_s": ratio(ARMS[3], ARMS[2], "aggregate_tokens_per_s"),
        "n4_every_first_token_over_1_stream": ratio(ARMS[3], ARMS[4], "every_first_token_ms"),
        "4_streams_every_first_token_over_1_stream": ratio(
            ARMS[2], ARMS[4], "every_first_token_ms"
        ),
    }
    goals = {
        "logprobs_cost_at_most_15_percent": ratios["top_logprobs_5_over_plain_tokens_per_s"]
        >= 0.85,
        "n4_tokens_per_s_at_least_4_streams": ratios["n4_over_4_streams_tokens_per_s"] >= 1.0,
        "n4_first_tokens_within_1.2x_one_stream": ratios["n4_every_first_token_over_1_stream"]
        <= 1.2,
        "every_arm_complete": all(row["completed"] for row in rows),
    }
    return {"rows": rows, "medians": [medians[a] for a in ARMS], "ratios": ratios, "goals": goals}


def _by_tokens_per_s(row: dict[str, Any]) -> float:
    value: float = row["aggregate_tokens_per_s"]
    return value


def plot_sampling(medians: list[dict[str, Any]], threads: int) -> Any:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    names = [row["arm"] for row in medians]
    axes[0].barh(names, [row["aggregate_tokens_per_s"] for row in medians])
    axes[0].set_title("aggregate tokens/s (median round)")
    axes[1].barh(names, [row["every_first_token_ms"] for row in medians])
    axes[1].set_title("every answer's first token (ms, median round)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle(
        f"issue 28 on sluice: SmolLM2-135M Q4_1, {os.cpu_count()} cores, llama.cpp on {threads} "
        f"thread(s), 8 sequences, greedy, {MAX_TOKENS} tokens per answer",
        y=1.03,
    )
    fig.tight_layout()
    return fig


def main_sampling(rounds: int, threads: int) -> None:
    result = sampling(rounds, threads)
    common.save(
        "sampling",
        {"rounds": rounds, "threads": threads, "max_tokens": MAX_TOKENS, **result},
        plot_sampling(result["medians"], threads),
    )
    columns = ["arm", "answers", "tokens", "aggregate_tokens_per_s", "first_token_ms"]
    print(common.table(result["medians"], [*columns, "every_first_token_ms"]))
    print(result["ratios"])
    print(result["goals"])


def main() -> None:
    parser = common.sweep_arguments(__doc__, levels="1,2,4,8,16")
    parser.add_argument("--structured", action="store_true", help="issue 22's arm instead")
    parser.add_argument("--sampling", action="store_true", help="issue 28's arms instead")
    parser.add_argument(
        "--threads",
        type=int,
        default=Settings(backend="llama").n_threads,
        help="llama.cpp's threads for --sampling and --structured (1 holds up on a machine "
        "others load)",
    )
    args = parser.parse_args()
    if args.structured:
        main_structured(args.rounds, args.threads)
        return
    if args.sampling:
        main_sampling(args.rounds, args.threads)
        return
    result = sweep(args.levels, args.rounds)
    result["goals"] = goals(result)
    common.save(
        "batching",
        {"rounds": args.rounds, "max_tokens": MAX_TOKENS, **result},
        plot(result["rows"]),
    )
    print(common.table(result["rows"], COLUMNS))
    print(result["ratios"])
    print(result["greedy_alone_vs_batch_of_8"])
    print(result["goals"])


if __name__ == "__main__":
    main()
