"""Prometheus metrics of an API process (`GET /metrics`), and the deployment's state from Redis.

The time to first token is split where sluice can see it: waiting in the queue (enqueue to a
worker's claim), prefill (claim to the first token written), and relay (a token written to
Redis to its event written to the client). Times that span processes are read from one clock,
Redis's: the queue time from the submit script's and the claim script's `TIME`, prefill and
relay from entry ids (Redis's milliseconds) and `StreamHub.age_s`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from starlette.types import ASGIApp, Receive, Scope, Send

from api.relay import Batch, Waiting
from shared.protocol import (
    Delta,
    Failed,
    Finished,
    Started,
    Token,
    worker_ttl_ms,
)
from shared.status import STATUS_KEYS, STATUS_SCRIPT, Status, status_args

if TYPE_CHECKING:
    from opentelemetry.trace import Span

ARRIVED = "sluice_arrived"
"""Where `StampArrival` puts a request's arrival in its ASGI scope's `state`."""
AgeOf = Callable[[str], float]
"""How long ago Redis wrote an entry, by its id (`StreamHub.age_s`)."""

# Seconds: from a couple of milliseconds (the relay) to minutes (a queue under load).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TTFT = Histogram(
    "sluice_time_to_first_token_seconds",
    "Request received to its first token sent to the client",
    ["model"],
    buckets=BUCKETS,
)
QUEUE_TIME = Histogram(
    "sluice_request_queue_time_seconds",
    "Enqueued to claimed by a worker",
    ["model"],
    buckets=BUCKETS,
)
PREFILL_TIME = Histogram(
    "sluice_request_prefill_time_seconds",
    "Claimed by a worker to its first token written to Redis",
    ["model"],
    buckets=BUCKETS,
)
RELAY_DELAY = Histogram(
    "sluice_relay_delay_seconds",
    "A token written to Redis to its event written to the client",
    ["model"],
    buckets=BUCKETS,
)
INTER_TOKEN = Histogram(
    "sluice_inter_token_latency_seconds",
    "Between consecutive content events sent to a client",
    ["model"],
    buckets=BUCKETS,
)
E2E = Histogram(
    "sluice_e2e_request_latency_seconds",
    "Request received to its stream's end sent",
    ["model"],
    buckets=BUCKETS,
)
GENERATION_TOKENS = Counter(
    "sluice_generation_tokens_total", "Tokens generated for requests served here", ["model"]
)
PROMPT_TOKENS = Counter(
    "sluice_prompt_tokens_total", "Prompt tokens of requests finished here", ["model"]
)
REQUESTS = Counter(
    "sluice_requests_total",
    "Requests served here, by how they ended: a finish reason or an error code",
    ["model", "outcome"],
)
RESUMES = Counter("sluice_resumes_total", "Streams resumed through this process", ["model"])
CANCELS = Counter("sluice_cancels_total", "Cancel requests accepted by this process", ["model"])
REJECTED = Counter(
    "sluice_rejected_total", "Requests refused before they were queued, by error code", ["code"]
)
WAITING = Gauge("sluice_requests_waiting", "Jobs waiting for a worker (deployment)", ["model"])
RUNNING = Gauge("sluice_requests_running", "Jobs a worker is running (deployment)", ["model"])
WORKERS = Gauge("sluice_workers", "Workers with a fresh heartbeat (deployment)", ["model"])
SLOTS = Gauge(
    "sluice_worker_slots", "Live workers' job slots, busy or free (deployment)", ["model", "state"]
)


class DeploymentState:
    """Sets the deployment-wide gauges from Redis, per model; called at each scrape."""

    def __init__(self, redis: Redis, heartbeat_s: float) -> None:
        self._script = redis.register_script(STATUS_SCRIPT)
        self._args = status_args(worker_ttl_ms(heartbeat_s))

    async def exposition(self) -> tuple[bytes, str]:
        status = Status.from_reply(await self._script(keys=STATUS_KEYS, args=self._args))
        for model in status.models:
            name = model.name
            WAITING.labels(name).set(model.queued)
            RUNNING.labels(name).set(model.running)
            WORKERS.labels(name).set(len(model.workers))
            busy = sum(w.busy for w in model.workers)
            SLOTS.labels(name, "busy").set(busy)
            SLOTS.labels(name, "free").set(max(0, model.slots - busy))
        return generate_latest(), CONTENT_TYPE_LATEST


class StampArrival:
    """Stamps each HTTP request with when it reached this process, before any other middleware,
    its parsing, validation or Redis: the time to first token counts from there (`arrived`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVED] = time.monotonic()
        await self.app(scope, receive, send)


def arrived(scope: Scope) -> float:
    """When the request of `scope` arrived (`StampArrival`); now, if it was not stamped."""
    return float(scope.get("state", {}).get(ARRIVED, time.monotonic()))


@dataclass(frozen=True, slots=True)
class _PerBatch:
    """A model's series of the histograms observed at every batch a relay sends, looked up once:
    prometheus_client's `labels()` costs more than the observation."""

    relay_delay: Histogram
    inter_token: Histogram


@cache
def _per_batch(model: str) -> _PerBatch:
    return _PerBatch(RELAY_DELAY.labels(model), INTER_TOKEN.labels(model))


@dataclass
class RequestClock:
    """One request's timings, fed by the batches its relay sends."""

    model: str
    queued_ms: int | None
    """None for a resumed stream: only what this process relays is measured."""
    span: Span | None = None
    """The request's trace span, ended with it (tracing on)."""
    received: float = field(default_factory=time.monotonic)
    """When the request arrived (`arrived`), for the time to first token."""
    claimed_ms: int | None = None
    first_sent: float | None = None
    last_sent: float | None = None

    def observe(self, batch: Batch, age_s: float) -> None:
        """`batch` is about to be written to the client; its newest entry is `age_s` old."""
        now = time.monotonic()
        tokens = [entry_id for entry_id, entry in batch if isinstance(entry, Token | Delta)]
        for _, entry in batch:
            match entry:
                case Started(_, _, claimed_ms) if self.queued_ms is not None:
                    if claimed_ms is not None:
                        self.claimed_ms = claimed_ms
                        QUEUE_TIME.labels(self.model).observe((claimed_ms - self.queued_ms) / 1000)
                case Finished(reason, prompt, completion) if self.queued_ms is not None:
                    # Both counted at the end, where every backend has them: an engine behind an
                    # API tells its prompt's size only with its usage, when its stream ends.
                    PROMPT_TOKENS.labels(self.model).inc(prompt)
                    GENERATION_TOKENS.labels(self.model).inc(completion)
                    self._end(reason, now)
                case Failed(error) if self.queued_ms is not None:
                    self._end(error["code"] or error["type"], now)
        if not tokens:
            return
        series = _per_batch(self.model)
        series.relay_delay.observe(max(0.0, age_s))
        if self.first_sent is None and self.queued_ms is not None:
            self.first_sent = now
            TTFT.labels(self.model).observe(now - self.received)
            if self.claimed_ms is not None:
                first_ms = int(tokens[0].partition("-")[0])
                PREFILL_TIME.labels(self.model).observe((first_ms - self.claimed_ms) / 1000)
        elif self.last_sent is not None:
            series.inter_token.observe(now - self.last_sent)
        self.last_sent = now

    def _end(self, outcome: str, now: float) -> None:
        REQUESTS.labels(self.model, outcome).inc()
        E2E.labels(self.model).observe(now - self.received)
        if self.span is not None:
            self.span.set_attribute("sluice.outcome", outcome)

    def close(self) -> None:
        """The response is over (ended, or its client left)."""
        if self.span is not None:
            self.span.end()
            self.span = None


async def measured(
    entries: AsyncIterator[Batch | Waiting], clock: RequestClock, age_s: AgeOf
) -> AsyncIterator[Batch | Waiting]:
    """`entries`, passed through, observed by `clock` as each batch goes out."""
    async for item in entries:
        if not isinstance(item, Waiting):
            clock.observe(item, age_s(item[-1][0]))
        yield item
