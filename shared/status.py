"""The deployment as Redis sees it, in one round trip: for `/metrics` gauges and `sluice status`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.protocol import (
    ACTIVE_KEY,
    MODELS_KEY,
    QUEUE_PREFIX,
    SERVING_PREFIX,
    TOKENS_KEY,
    WAITING_PREFIX,
    WORKER_BUSY_KEY,
    WORKER_LOOPS_KEY,
    WORKER_MODELS_KEY,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
)
from shared.scripts import lua

STATUS_SCRIPT = lua("status")
STATUS_KEYS = [
    WORKERS_KEY,
    WORKER_SLOTS_KEY,
    WORKER_BUSY_KEY,
    WORKER_LOOPS_KEY,
    WORKER_MODELS_KEY,
    ACTIVE_KEY,
    TOKENS_KEY,
    MODELS_KEY,
]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    id: str
    heartbeat_age_ms: int
    slots: int
    busy: int
    failing_loops: str
    model: str
    available: bool


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    queued: int
    running: int
    workers: list[WorkerStatus]

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.workers)


@dataclass(frozen=True, slots=True)
class Status:
    open_streams: int
    tokens_last_minute: int
    models: list[ModelStatus]
    """Every model ever announced, by name, with its queue and its live workers."""

    @property
    def workers(self) -> list[WorkerStatus]:
        return [w for m in self.models for w in m.workers]

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Status:
        streams, tokens, models, workers = reply
        live = [
            WorkerStatus(
                _text(id), int(age), int(slots), int(busy), _text(loops), _text(model), ok == 1
            )
            for id, age, slots, busy, loops, model, ok in _groups(workers, 7)
        ]
        queues = {
            _text(name): (int(queued), int(running)) for name, queued, running in _groups(models, 3)
        }
        for worker in live:  # a model missing from the table (deleted by hand) still shows
            queues.setdefault(worker.model, (0, 0))
        return cls(
            int(streams),
            int(tokens),
            [
                ModelStatus(name, queued, running, [w for w in live if w.model == name])
                for name, (queued, running) in sorted(queues.items())
            ],
        )

    def render(self) -> str:
        """One screen for a person at a terminal."""
        lines = [
            f"streams    {self.open_streams} open",
            f"tokens/s   {self.tokens_last_minute / 60:.1f} over the last minute",
        ]
        for model in self.models:
            lines += [
                f"model {model.name}",
                f"  queue      {model.queued} waiting, {model.running} running",
                f"  workers    {len(model.workers)} live, {model.slots} slots",
            ]
            for w in sorted(model.workers, key=lambda w: w.id):
                notes = "" if w.available else "  unavailable: claims no job"
                if w.failing_loops:
                    notes += f"  failing loops: {w.failing_loops}"
                lines.append(
                    f"    {w.id:<40} {w.busy}/{w.slots} busy  beat {w.heartbeat_age_ms} ms ago"
                    + notes
                )
        return "\n".join(lines)


def status_args(heartbeat_ttl_ms: int) -> list[int | str]:
    return [heartbeat_ttl_ms, WAITING_PREFIX, QUEUE_PREFIX, SERVING_PREFIX]


def _groups(items: list[Any], size: int) -> Iterator[tuple[Any, ...]]:
    return zip(*[iter(items)] * size, strict=True)


def _text(value: int | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
