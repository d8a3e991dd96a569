"""What a gateway adds in front of an engine (issue 26): sluice, the bare proxy and LiteLLM's
proxy, against the engine asked directly, in one run.

The engine is scripted (bench/bare.py, an OpenAI-compatible server): every stream's first token
comes 200 ms after its request, then 20 tokens at 5 tokens/s, whatever else runs, so what a
gateway adds shows without an engine's prefill batching in the way (bench/upstream.py has the
real engine).

  sluice   `sluice api` + one `sluice worker` with SLUICE_BACKEND=openai (the engine upstream)
  proxy    bench/proxy.py: FastAPI and sse-starlette relaying the engine from the handler
  litellm  LiteLLM's proxy (`litellm[proxy]`, its own venv: bench/litellm.sh), one worker
           process, a master key, the engine as an `openai/` model
  direct   the engine itself

N streams at once (each on a connection of its own, `common.lean_stream`), the four taking
turns, `--rounds` times per level, each going first in turn; every process on every core. Per
gateway and level: the time to first token it adds (its p50 and p95 less the engine's own in
the same round, the median over rounds: nine by default, since one round's figure at 16
streams varies by a factor of three), and the CPU time its processes spent per request
(sluice: API, worker and Redis; LiteLLM: its process tree). Goals (issue 26): sluice adds less
than LiteLLM, in time and in CPU, and at most twice what the bare proxy adds.

    python -m bench.gateways [--levels 4,16] [--rounds 9]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import common
from tests.procs import Proc, answers, free_port, wait_until

ENGINE_RATE = 5.0
"""The scripted engine's tokens per second: its first token 200 ms after the request."""
TOKENS = 20
MASTER_KEY = "sk-bench-litellm"
SYSTEMS = ["sluice", "proxy", "litellm", "direct"]
ROOT = Path(__file__).parents[1]


@dataclass
class Gateway:
    name: str
    url: str
    processes: list[psutil.Process]
    headers: dict[str, str] = field(default_factory=dict)

    def cpu_s(self) -> float:
        """CPU seconds of its processes and their children."""
        total = 0.0
        for process in self.processes:
            for p in [process, *process.children(recursive=True)]:
                with suppress(psutil.NoSuchProcess):
                    total += common.process_cpu_s(p)
        return total


def request(n: int) -> dict[str, Any]:
    return {
        "model": "synthetic",
        "messages": [{"role": "user", "content": f"request {n}"}],
        "stream": True,
        "max_tokens": TOKENS,
    }


@contextmanager
def litellm_proxy(engine_v1: str) -> Iterator[tuple[Proc, str]]:
    """LiteLLM's proxy in front of the engine; its process and URL."""
    binary = subprocess.run(
        ["bash", str(ROOT / "bench" / "litellm.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: synthetic\n"
            "    litellm_params:\n"
            "      model: openai/synthetic\n"
            f"      api_base: {engine_v1}\n"
            "      api_key: unused\n"
            "general_settings:\n"
            f"  master_key: {MASTER_KEY}\n"
        )
        env = {
            # Offline: its model price list from the package, no telemetry.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
        }
        args = [binary, "--config", str(config), "--port", str(port), "--num_workers", "1"]
        proc = Proc(f"litellm-{port}", args, env).start()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: answers(f"{url}/health/liveliness"), 120, "LiteLLM's proxy")
            yield proc, url
        finally:
            proc.stop()


async def level(gateway: Gateway, n: int) -> dict[str, Any]:
    before = gateway.cpu_s()
    bodies = [request(next(_requests)) for _ in range(n)]
    timings, wall = await common.concurrent_streams(gateway.url, bodies, headers=gateway.headers)
    cpu_s = gateway.cpu_s() - before
    return {**common.level_stats(timings, wall), "cpu_ms_per_request": 1000 * cpu_s / n}


_requests = itertools.count(1)


def measure(levels: list[int], rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    done, total = itertools.count(1), len(levels) * rounds * len(SYSTEMS)
    with ExitStack() as run:
        engine_proc, engine = run.enter_context(
            common.anchor_server("bench.bare", "--tokens-per-s", str(ENGINE_RATE))
        )
        redis = run.enter_context(common.redis_server())
        stack = run.enter_context(
            common.sluice_stack(
                redis, 1, backend="openai", upstream_url=f"{engine}/v1", access_log="false"
            )
        )
        proxy, proxy_url = run.enter_context(
            common.anchor_server("bench.proxy", "--upstream", f"{engine}/v1")
        )
        litellm, litellm_url = run.enter_context(litellm_proxy(f"{engine}/v1"))
        gateways = {
            "sluice": Gateway(
                "sluice",
                stack.base_url,
                [psutil.Process(p) for p in (stack.api.pid, stack.workers[0].pid, redis.pid)],
            ),
            "proxy": Gateway("proxy", proxy_url, [psutil.Process(proxy.pid)]),
            "litellm": Gateway(
                "litellm",
                litellm_url,
                [psutil.Process(litellm.pid)],
                {"Authorization": f"Bearer {MASTER_KEY}"},
            ),
            "direct": Gateway("direct", engine, [psutil.Process(engine_proc.pid)]),
        }
        for gateway in gateways.values():  # first requests cost what later ones do not
            asyncio.run(level(gateway, max(levels)))
        for n in levels:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
            for r in range(rounds):
                for system in SYSTEMS[r % len(SYSTEMS) :] + SYSTEMS[: r % len(SYSTEMS)]:
                    runs[system].append(asyncio.run(level(gateways[system], n)))
                    common.progress(next(done), total, f"gateways {n} streams")
            rows += [summarize(system, n, runs[system], runs["direct"]) for system in SYSTEMS]
    return rows


def summarize(
    system: str, n: int, runs: list[dict[str, Any]], direct: list[dict[str, Any]]
) -> dict[str, Any]:
    pairs = list(zip(runs, direct, strict=True))
    return {
        "system": system,
        "streams": n,
        "completed": min(r["completed"] for r in runs),
        "ttft_p50_ms": common.median([r["ttft_p50_ms"] for r in runs]),
        "added_p50_ms": common.median([r["ttft_p50_ms"] - d["ttft_p50_ms"] for r, d in pairs]),
        "added_p95_ms": common.median([r["ttft_p95_ms"] - d["ttft_p95_ms"] for r, d in pairs]),
        "cpu_ms_per_request": common.median([r["cpu_ms_per_request"] for r in runs]),
        "first_error": next((r["first_error"] for r in runs if r["first_error"]), ""),
        "rounds": runs,
    }


def goals(rows: list[dict[str, Any]]) -> dict[str, bool]:
    out = {}
    for n in sorted({r["streams"] for r in rows}):
        by = {r["system"]: r for r in rows if r["streams"] == n}
        sluice, proxy, litellm = by["sluice"], by["proxy"], by["litellm"]
        out[f"{n}_streams_sluice_adds_less_ttft_than_litellm"] = (
            sluice["added_p50_ms"] < litellm["added_p50_ms"]
        )
        out[f"{n}_streams_sluice_spends_less_cpu_than_litellm"] = (
            sluice["cpu_ms_per_request"] < litellm["cpu_ms_per_request"]
        )
        out[f"{n}_streams_sluice_adds_at_most_2x_the_proxy"] = sluice["added_p50_ms"] <= 2 * max(
            proxy["added_p50_ms"], 0.0
        )
    return out


def main() -> None:
    parser = common.sweep_arguments(__doc__, levels="4,16", rounds=9)
    args = parser.parse_args()
    rows = measure(args.levels, args.rounds)
    result = {"rows": rows, "goals": goals(rows)}
    common.save("gateways", {"rounds": args.rounds, "tokens": TOKENS, **result})
    print(
        common.table(
            rows,
            [
                "system",
                "streams",
                "completed",
                "ttft_p50_ms",
                "added_p50_ms",
                "added_p95_ms",
                "cpu_ms_per_request",
                "first_error",
            ],
        )
    )
    print(result["goals"])


if __name__ == "__main__":
    main()
