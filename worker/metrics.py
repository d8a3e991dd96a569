"""Prometheus metrics of a worker process, served on `SLUICE_WORKER_METRICS_PORT` when set."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

TOKENS = Counter("sluice_worker_tokens_total", "Tokens this worker processed, by phase", ["phase"])
DECODE_BATCH = Histogram(
    "sluice_worker_decode_batch_size",
    "Sequences decoded together in one step (backends that batch)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


def serve(port: int | None) -> None:
    """Serve /metrics on `port` from a thread of this process (none when unset)."""
    if port is not None:
        start_http_server(port)
