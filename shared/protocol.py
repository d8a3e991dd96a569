"""The stream protocol: every Redis key sluice writes, the entries of a job's stream, their TTLs.

A job's stream holds, in order: one `Started`, any number of `Token`s, then exactly one
terminal entry, `Finished` or `Failed`. The API relays entries; the worker appends them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from shared.errors import ErrorBody

PREFIX = "sluice:"
QUEUE_NAME = PREFIX + "queue"
"""The arq queue (a sorted set). arq keeps its own per-job keys under `arq:`."""
JOB_FUNCTION = "generate"
WAKE_CHANNEL = PREFIX + "wake"
"""Pub/Sub channel: the API publishes after each enqueue so idle workers poll at once."""
WORKERS_KEY = PREFIX + "workers"
"""Sorted set: worker id -> last heartbeat (ms). Members older than `worker_ttl_ms` are dead."""


def stream_key(stream_id: str) -> str:
    return f"{PREFIX}stream:{stream_id}"


def hub_wake_key(instance_id: str) -> str:
    """A small stream per API process, written to interrupt that process's blocking XREAD."""
    return f"{PREFIX}hub:{instance_id}"


def worker_ttl_ms(heartbeat_s: float) -> int:
    return int(heartbeat_s * 3 * 1000)


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Started:
    worker: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Token:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    error: ErrorBody


Entry = Started | Token | Finished | Failed
TERMINAL = (Finished, Failed)

# Field names are one letter: a token entry is written once per generated token.
_KIND = "k"


def encode(entry: Entry) -> dict[str, str | int]:
    match entry:
        case Token(text):
            return {_KIND: "t", "x": text}
        case Started(worker, prompt_tokens):
            return {_KIND: "s", "w": worker, "p": prompt_tokens}
        case Finished(reason, prompt_tokens, completion_tokens):
            return {_KIND: "f", "r": reason, "p": prompt_tokens, "c": completion_tokens}
        case Failed(error):
            return {_KIND: "e", "e": json.dumps(error)}


def decode(fields: dict[bytes, bytes]) -> Entry:
    kind = fields[b"k"]
    if kind == b"t":
        return Token(fields[b"x"].decode())
    if kind == b"s":
        return Started(fields[b"w"].decode(), int(fields[b"p"]))
    if kind == b"f":
        reason: FinishReason = "length" if fields[b"r"] == b"length" else "stop"
        return Finished(reason, int(fields[b"p"]), int(fields[b"c"]))
    if kind == b"e":
        return Failed(json.loads(fields[b"e"]))
    raise ValueError(f"unknown stream entry kind {kind!r}")


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
