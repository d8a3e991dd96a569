"""What every benchmark shares: servers to measure, a timed SSE client, results on disk.

Load goes only to addresses on this machine, and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import redis

from tests.procs import Proc, RedisServer, Stack, answers, free_port, start_stack, wait_until

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / os.environ.get("SLUICE_BENCH_RESULTS", "bench/results")
"""Where results go (`make bench-quick` sends its short runs elsewhere)."""


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Timing:
    """One streamed request, as its client saw it."""

    ok: bool = False
    error: str = ""
    ttft_s: float = float("nan")
    sent_s: float = float("nan")
    """When the request's last byte was written to the socket: what came before (a client of its
    own, a connection, encoding) is the load generator's work, not the server's."""
    total_s: float = float("nan")
    chars: int = 0
    chunks: int = 0
    content_events: int = 0
    completion_tokens: int | None = None
    first_by_choice_s: dict[int, float] = field(default_factory=dict)
    """When each choice's first content came (a request with `n` > 1 has several)."""
    gaps_s: list[float] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    _last: float = field(default=0.0, repr=False)

    @property
    def tokens(self) -> int:
        """Tokens generated: as the server counted them (its usage), else content events."""
        return self.completion_tokens or self.content_events

    @property
    def ttft_after_sent_s(self) -> float:
        """Time to first token from the request's last byte: the server's share alone."""
        return self.ttft_s - self.sent_s

    @property
    def tokens_per_s(self) -> float:
        """Tokens over generation time (first token to last), the usual decode-speed figure."""
        span = sum(self.gaps_s)
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")

    def record(self, text: str, start: float, choice: int = 0) -> None:
        """A piece of content of `choice` arrived now; `start` is when the request was sent."""
        now = time.perf_counter()
        self.first_by_choice_s.setdefault(choice, now - start)
        if self.content_events == 0:
            self.ttft_s = now - start
        else:
            self.gaps_s.append(now - self._last)
        self._last = now
        self.content_events += 1
        self.chars += len(text)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        del out["gaps_s"], out["_last"]
        out["tokens_per_s"] = self.tokens_per_s
        return out


HEADERS_KEPT = ("cache-control", "x-accel-buffering", "x-sluice-stream-id")


def take_line(timing: Timing, line: str, start: float) -> bool:
    """One line of an SSE body into `timing`; True at `[DONE]`."""
    if not line.startswith("data: "):
        return False
    data = line[6:]
    if data == "[DONE]":
        timing.ok = not timing.error
        return True
    chunk = json.loads(data)
    if "error" in chunk:
        timing.error = chunk["error"]["message"]
        return False
    if chunk.get("usage"):
        timing.completion_tokens = chunk["usage"]["completion_tokens"]
    if not chunk.get("choices"):
        return False
    timing.chunks += 1
    for choice in chunk["choices"]:
        text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        if text:
            timing.record(text, start, choice.get("index", 0))
    return False


async def timed_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Timing:
    """POST a streaming request and time it: first content, gaps between content, the end."""
    timing = Timing()
    start = time.perf_counter()

    async def trace(event: str, _: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            timing.sent_s = time.perf_counter() - start

    try:
        async with client.stream("POST", path, json=body, extensions={"trace": trace}) as response:
            timing.headers = {k: response.headers.get(k, "") for k in HEADERS_KEPT}
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timing
            async for line in response.aiter_lines():
                if take_line(timing, line, start):
                    break
    except httpx.HTTPError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    timing.total_s = time.perf_counter() - start
    return timing


async def lean_stream(
    url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Timing:
    """`timed_stream` for a load generator that shares a core with what it measures: the same
    request and timings on a connection of its own, in plain asyncio streams (HTTP/1.1, `http:`
    only). An httpx client per stream costs about 1.5 ms of CPU per request here, four times
    this, and on a shared core that is time taken from the server under test."""
    timing = Timing()
    start = time.perf_counter()
    where = urlsplit(url)
    if where.scheme != "http" or not where.hostname or not where.port:
        raise ValueError(f"lean_stream speaks plain HTTP to a host and port, not {url}")
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{extra}Content-Length: {len(payload)}\r\n\r\n"
    )
    try:
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
    except OSError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
        return timing
    try:
        writer.write(head.encode() + payload)
        await writer.drain()
        timing.sent_s = time.perf_counter() - start
        head_in = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head_in.split("\r\n")
        fields = (line.partition(":") for line in lines if line)
        received = {name.strip().lower(): value.strip() for name, _, value in fields}
        timing.headers = {k: received.get(k, "") for k in HEADERS_KEPT}
        status = int(status_line.split(" ", 2)[1])
        if status != 200:
            timing.error = f"HTTP {status}: {(await reader.read(200))!r}"
            return timing
        async for line in _body_lines(reader, received):
            if take_line(timing, line, start):
                break
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
    timing.total_s = time.perf_counter() - start
    return timing


async def _body_lines(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[str]:
    """A response body's lines, as they arrive: chunked, of a set length, or until the
    connection closes."""
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    if "content-length" in headers and not chunked:
        body = await reader.readexactly(int(headers["content-length"]))
        for text in body.decode().splitlines():
            yield text
        return
    pending = b""
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            data = (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.decode()


async def concurrent_streams(
    url: str,
    bodies: Sequence[dict[str, Any]],
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> tuple[list[Timing], float]:
    """Every body streamed at once, each on a connection of its own (as separate users would,
    by `lean_stream`);
    returns their timings and the wall time from the first request to the last end."""
    start = time.perf_counter()
    timings = await asyncio.gather(*(lean_stream(url, path, body, headers) for body in bodies))
    return list(timings), time.perf_counter() - start


def level_stats(timings: Sequence[Timing], wall_s: float) -> dict[str, Any]:
    """Concurrent streams, summed up: how many completed, their aggregate tokens/s (every
    completed stream's tokens over the wall time), time to first token p50/p95, the first error."""
    ok = [t for t in timings if t.ok and t.tokens > 0]
    ttfts = [t.ttft_s * 1000 for t in ok]
    return {
        "streams": len(timings),
        "completed": len(ok),
        "aggregate_tokens_per_s": sum(t.tokens for t in ok) / wall_s,
        "ttft_p50_ms": median(ttfts),
        "ttft_p95_ms": pct(ttfts, 95),
        "wall_s": wall_s,
        "first_error": next((t.error or "ended before [DONE]" for t in timings if not t.ok), ""),
    }


def sweep_arguments(doc: str | None, levels: str, rounds: int = 3) -> argparse.ArgumentParser:
    """A sweep's command line: its docstring's first paragraph as help, `--levels` (given
    comma-separated, parsed to a list) and `--rounds`."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--levels", default=levels, type=lambda given: [int(n) for n in given.split(",")]
    )
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    bar = "#" * filled + "." * (width - filled)
    print(f"\r{label:<28} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(name: str, data: dict[str, Any], figure: Any = None) -> Path:
    """bench/results/<name>.json (and .png); returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str) + "\n")
    if figure is not None:
        figure.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    return path


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def sluice_stack(redis: RedisServer, workers: int, db: int = 0, **settings: str) -> Iterator[Stack]:
    """`sluice api` and `workers` worker processes on database `db` of `redis`, stopped on
    exit (stacks on one Redis need databases of their own, or they share a queue)."""
    stack = start_stack(
        f"bench-{settings.get('backend', 'llama')}-{db}", redis.url(db), workers, **settings
    )
    try:
        yield stack
    finally:
        stack.stop()


@contextmanager
def anchor_server(module: str, *args: str) -> Iterator[tuple[Proc, str]]:
    """`python -m <module> --port P <args>` (an anchor server: bench/bare.py, bench/proxy.py),
    once it answers; its process and URL, stopped on exit."""
    port = free_port()
    name = f"{module.replace('.', '-')}-{port}"
    proc = Proc(name, [sys.executable, "-m", module, "--port", str(port), *args]).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url), 30, name)
        yield proc, url
    finally:
        proc.stop()


@contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """This process, and every process it starts meanwhile, on `cpus` only (None: anywhere)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    _pin_own_threads(cpus)
    try:
        yield
    finally:
        _pin_own_threads(before)


def _pin_own_threads(cpus: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):  # a mask is a thread's own, not its process's
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """Each process's CPU time so far: to the nanosecond from its threads' scheduler statistics
    where Linux keeps them (`cpu_times` counts in 10 ms ticks, too coarse for short windows)."""
    return {name: process_cpu_s(p) for name, p in processes.items()}


def process_cpu_s(process: psutil.Process) -> float:
    """One process's CPU seconds so far (see `cpu_seconds`)."""
    try:
        tasks = list(Path(f"/proc/{process.pid}/task").iterdir())
    except FileNotFoundError:  # no scheduler statistics here (or the process is gone)
        return sum(process.cpu_times()[:2])
    total_ns = 0
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
            total_ns += int((task / "schedstat").read_text().split()[0])
    return total_ns / 1e9


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table for stdout."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


SCRIPT_COMMANDS = frozenset(
    name.lower()
    for path in (ROOT / "shared" / "lua").rglob("*.lua")
    for name in re.findall(r"redis\.p?call\('(\w+)'", path.read_text())
)
"""The commands sluice's scripts call, as `INFO commandstats` names them."""
OWN_COMMANDS = frozenset({"client", "config", "info", "slowlog"})
"""What the benchmarks send to watch Redis (connections, stats), left out of its time."""
SCRIPT_CLIENT = b"?:0"
"""The client address SLOWLOG gives a command a script called."""


class RedisCommandTime:
    """Redis's own time in commands over a window: `INFO commandstats` (reset when the window
    opens), and from `SLOWLOG` the calls that held Redis for over 1 ms, scripts named from
    `scripts`. With `trace`, SLOWLOG records every call (at some cost to Redis) and the time is
    also given by call, each script apart.

    Redis counts a script's commands twice: in their own lines and again in the script's
    (`by_command_us` shows them as Redis counts). `usec` counts each once, in its script: a
    command that sluice's scripts call (`SCRIPT_COMMANDS`) is left out of it, and so are the
    few that sluice also sends on their own under load (the hub's wake XADD and EXPIRE: a
    couple of microseconds per XREAD call that a new stream joins). SLOWLOG names a script's
    commands by no client; they are left out of the calls too. What the benchmark itself sends to
    watch Redis (`OWN_COMMANDS`) is not counted."""

    SLOW_US = 1000
    MAX_CALLS = 500_000

    def __init__(
        self, url: str, scripts: dict[str, str] | None = None, trace: bool = False
    ) -> None:
        self._redis = redis.Redis.from_url(url)
        self._trace = trace
        self._names = {
            hashlib.sha1(text.encode()).hexdigest(): name for name, text in (scripts or {}).items()
        }

    def open(self) -> None:
        self._redis.config_set("slowlog-log-slower-than", 0 if self._trace else self.SLOW_US)
        self._redis.config_set("slowlog-max-len", self.MAX_CALLS)
        self._redis.slowlog_reset()
        self._redis.config_resetstat()

    def close(self) -> dict[str, Any]:
        stats = self._redis.info("commandstats")
        log = self._redis.slowlog_get(self.MAX_CALLS)
        self._redis.config_set("slowlog-log-slower-than", 10_000)
        self._redis.slowlog_reset()
        by_command = {name.removeprefix("cmdstat_"): int(s["usec"]) for name, s in stats.items()}
        once = {
            name: usec
            for name, usec in by_command.items()
            if name not in SCRIPT_COMMANDS and name.partition("|")[0] not in OWN_COMMANDS
        }
        by_call: dict[str, int] = {}
        calls: dict[str, int] = {}
        longest: dict[str, int] = {}
        slow = 0
        for entry in log:
            if entry.get("client_address") == SCRIPT_CLIENT:
                continue
            name, duration = self._call(bytes(entry["command"])), int(entry["duration"])
            if name in OWN_COMMANDS:
                continue
            by_call[name] = by_call.get(name, 0) + duration
            calls[name] = calls.get(name, 0) + 1
            longest[name] = max(longest.get(name, 0), duration)
            slow += duration > self.SLOW_US
        return {
            "usec": sum(once.values()),
            "by_command_us": dict(sorted(by_command.items(), key=lambda kv: -kv[1])[:6]),
            "calls_over_1ms": slow,
            "longest_us": dict(sorted(longest.items(), key=lambda kv: -kv[1])[:4]),
            **(
                {
                    "by_call_us": dict(sorted(by_call.items(), key=lambda kv: -kv[1])),
                    "calls": calls,
                    "longest_by_call_us": longest,
                }
                if self._trace
                else {}
            ),
        }

    def _call(self, command: bytes) -> str:
        name, _, rest = command.partition(b" ")
        if name.upper() != b"EVALSHA":
            return name.decode().lower()
        sha = rest.partition(b" ")[0].decode()
        return "script " + self._names.get(sha, sha[:8])
