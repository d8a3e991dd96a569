"""The stream protocol: every Redis key sluice writes, the entries of a job's stream, their TTLs.

A job's stream holds, in order: one `Started`, any number of `Token`s and `Delta`s, then exactly
one terminal entry, `Finished` or `Failed`. The API relays entries; the worker appends them.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from redis.typing import EncodableT, FieldT

from shared.errors import ErrorBody, RedisFailover, StreamTruncated

PREFIX = "sluice:"
QUEUE_PREFIX = PREFIX + "queue:"
"""Followed by a model's name: that model's arq queue (see `queue_name`)."""
WAITING_PREFIX = PREFIX + "waiting:"
"""Followed by a model's name: the jobs of its queue that no worker has taken yet (arq keeps a
running job in its queue until it ends), so that a worker's claim looks at those only."""
WAKE_PREFIX = PREFIX + "wake:"
"""Followed by a model's name: the Pub/Sub channel its workers listen on (see `wake_channel`)."""
JOB_FUNCTION = "generate"
WORKERS_KEY = PREFIX + "workers"
"""Sorted set: worker id -> last heartbeat (ms). Members older than `worker_ttl_ms` are dead."""
WORKER_SLOTS_KEY = PREFIX + "worker-slots"
"""Hash: worker id -> how many jobs it runs at once. Admission control sums the live ones."""
WORKER_MODELS_KEY = PREFIX + "worker-models"
"""Hash: worker id -> the model it serves (`SLUICE_SERVED_MODEL_NAME`)."""
SERVING_PREFIX = PREFIX + "serving:"
"""Followed by a model's name: its workers that can serve now (see `serving_key`)."""
MODELS_KEY = PREFIX + "models"
"""Hash: model -> JSON `{"n_ctx", "announced"}` (context length or absent, Redis ms), written
by every heartbeat of its workers and never expired, so that a model whose workers are all gone
(503) can be told from one never served (404)."""
READERS_KEY = PREFIX + "readers"
"""Sorted set: stream id -> when an API process last saw a client reading it (ms)."""
ORPHANS_KEY = PREFIX + "orphans"
"""Sorted set: job id (an attempt) -> from when it may have no worker (Redis's clock, ms): a job
a worker took from the queue, a worker TTL after it was taken, until the worker claims its
stream; and at once (score 0) the attempts of a worker that died (see `jobs_key`), let go of
them, or gave them back. The supervisor looks at those whose time has come, and only those."""
JOBS_PREFIX = PREFIX + "jobs:"
"""Followed by a worker id: the set of attempts it runs (see `jobs_key`)."""
CANCEL_CHANNEL = PREFIX + "cancel"
"""Pub/Sub channel: `<stream id> <reason>` for a generation to stop (see `StopReason`)."""
ACTIVE_KEY = PREFIX + "active"
"""Sorted set: stream id -> when it was submitted (Redis's clock, ms), until its stream ends:
the streams open in the deployment."""
DUE_KEY = PREFIX + "due"
"""Sorted set: stream id -> when the supervisor must next decide what becomes of it (Redis's
clock, ms): its queue timeout while queued, its job deadline while running, the end of its
resume grace while unread. The supervisor looks only at streams that are due."""
SUPERVISOR_KEY = PREFIX + "supervisor"
"""The supervisor's lease: the id of the one API process that supervises jobs, with a TTL."""
WORKER_BUSY_KEY = PREFIX + "worker-busy"
"""Hash: worker id -> how many jobs it was running at its last heartbeat."""
TOKENS_KEY = PREFIX + "tokens"
"""Hash: minute (Redis's clock) -> tokens generated in it by finished streams, deployment-wide."""
WORKER_LOOPS_KEY = PREFIX + "worker-loops"
"""Hash: worker id -> its background loops that are not running ('' when all are)."""

KEY_REQUESTS_PREFIX = PREFIX + "key-requests:"
KEY_TOKENS_PREFIX = PREFIX + "key-tokens:"
"""Hashes per API key name: minute (Redis's clock) -> requests admitted / tokens generated in it,
for the key's sliding-window limits. They expire three minutes after their last write."""
KEY_STREAMS_PREFIX = PREFIX + "key-streams:"
"""Sorted set per API key name: its streams still generating -> when submitted (Redis ms)."""

StopReason = Literal["cancelled", "unread"]


def queue_name(model: str) -> str:
    """The arq queue (a sorted set) of the jobs routed to `model`; arq keeps its own per-job
    keys under `arq:`."""
    return QUEUE_PREFIX + model


def jobs_key(worker_id: str) -> str:
    """Set: the attempts `worker_id` runs, from its claim of a stream to the stream's end. A
    worker gone quiet for a TTL is buried: its attempts become orphans."""
    return JOBS_PREFIX + worker_id


def waiting_key(model: str) -> str:
    return WAITING_PREFIX + model


def serving_key(model: str) -> str:
    """Sorted set: worker id -> last heartbeat (ms), for the workers of `model` whose backend
    can serve. One whose backend cannot (an upstream that does not answer) leaves it but still
    beats in `WORKERS_KEY`, so its running jobs are not retried: it claims nothing, and counts
    for neither admission nor `/v1/models`."""
    return SERVING_PREFIX + model


def wake_channel(model: str) -> str:
    """Published after each enqueue for `model`, so its idle workers poll at once."""
    return WAKE_PREFIX + model


STREAM_PREFIX = PREFIX + "stream:"


def stream_key(stream_id: str) -> str:
    return STREAM_PREFIX + stream_id


META_PREFIX = PREFIX + "meta:"


def meta_key(stream_id: str) -> str:
    """Hash: what a resumed relay needs (`StreamMeta`), which job attempt is current (`job`,
    the fencing token of every append), and the supervisor's facts: `queued` and `started`
    (Redis's clock, ms), `unread` (since when no client reads it), `ended` (the id of its
    terminal entry, once written). Set at submit: `cap` (the most entries its stream keeps,
    `entry_cap`), `pinned` (a background response: it runs whoever reads it) and `keep` (the
    TTL its stream and metadata get at the end, where it is not the stream TTL: a stored
    response's). Set by a cancel: `cancel`, which the next append of a token sees. Kept by
    every append (shared/lua/lib/fenced_append.lua): `n` (how many entries the stream has: the
    last one's number), `ms` (the millisecond part of its id), `wn` (the number of the last
    entry a worker appended, checked) and `claim` (the run of the attempt that claimed it)."""
    return META_PREFIX + stream_id


def job_id(stream_id: str, attempt: int) -> str:
    """The arq job id of one attempt at a stream; a job lost with its worker is tried again."""
    return f"{stream_id}.{attempt}"


MAX_ATTEMPTS = 2
"""A job lost with its worker before any token (or given back by a worker whose engine is down)
is tried once more; a second loss is final."""


def attempt_number(arq_job_id: str) -> int:
    return int(arq_job_id.rpartition(".")[2])


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at a stream: who may append to it, and where."""

    stream_id: str
    job: str
    """The arq job id, `<stream id>.<n>`: the fencing token of its appends."""

    @property
    def stream_key(self) -> str:
        return stream_key(self.stream_id)

    @property
    def meta_key(self) -> str:
        return meta_key(self.stream_id)


BELLS_KEY = PREFIX + "bells"
"""A stream every append rings: each script call that appends to job streams adds one entry,
`k` the keys of the streams it appended to, space-separated (shared/lua/lib/fenced_append.lua).
An API process's hub reads it to learn which streams have new entries, rather than asking for
every stream it waits for in each read (api/hub.py)."""
BELLS_KEEP_MS = 20_000
"""How long a bell is kept: older ones are trimmed as new ones come, and the key expires that
long after the last. A hub that has not read for half as long forgets what it knew and asks
every stream again."""


def hub_wake_key(instance_id: str) -> str:
    """A small stream per API process, written to interrupt that process's blocking XREAD."""
    return f"{PREFIX}hub:{instance_id}"


def hub_ack_key(instance_id: str) -> str:
    """A string per API process (60 s TTL), written just before it `WAIT`s for a replica to
    have a stream's end (api/replicas.py)."""
    return f"{PREFIX}ack:{instance_id}"


def new_worker_id() -> str:
    """`<host>-<pid>-<nonce>`: a probe on the worker's host (its pod, its container) finds it
    by `worker_host`."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def worker_host(worker_id: str) -> str:
    """The host a worker id names, whole (a host name may hold dashes: `worker-1` is not
    `worker-1-0`)."""
    return worker_id.rsplit("-", 2)[0]


def worker_ttl_ms(heartbeat_s: float) -> int:
    """A worker (or a reader) not heard from for three periods is gone."""
    return int(heartbeat_s * 3 * 1000)


def job_deadline_ms(job_timeout_s: float, heartbeat_s: float) -> int:
    """How long after its claim the supervisor ends a stream still generating: the job timeout,
    and a worker TTL more, so that the worker's own timeout comes first."""
    return int(job_timeout_s * 1000) + worker_ttl_ms(heartbeat_s)


ENTRY_CAP_SLACK = 8


def entry_cap(max_tokens: int, choices: int = 1) -> int:
    """The most entries a stream of `choices` answers of at most `max_tokens` tokens each can
    need: a token entry (or delta) holds at least one token, each choice's finish reason may
    come in a delta of its own, and `Started` and the terminal entry are one each. A stream is
    capped there (XADD MAXLEN), so trimming never takes an entry of its own."""
    extra_finishes = choices if choices > 1 else 0
    return choices * max_tokens + extra_finishes + ENTRY_CAP_SLACK


def now_ms() -> int:
    """This host's clock: for what clients are told (`created`), never to judge liveness."""
    return int(time.time() * 1000)


REFUSED_FENCED = b"fenced"
REFUSED_CANCELLED = b"cancelled"
REFUSED_LOST = b"lost"
"""What the fenced append (shared/lua/lib/fenced_append.lua) returns for an append it refuses:
the attempt is not the stream's current one or the stream has ended; a token of a cancelled
stream; the stream lacks entries its writer had stored (a Redis failover lost them)."""
ALREADY_STORED = b"stored"
"""What the fenced append returns for an entry that an earlier try stored (its answer lost)."""


FinishReason = Literal["stop", "length", "tool_calls"]
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "tool_calls")
StreamKind = Literal["chat.completion.chunk", "text_completion"]


@dataclass(frozen=True, slots=True)
class StreamMeta:
    kind: StreamKind
    created: int
    include_usage: bool
    job: str
    """The arq job id of the current attempt."""
    owner: str
    """The name of the API key that created it (`ANONYMOUS` while authentication is off)."""
    model: str
    """The model it was routed to: its queue, and the `model` of every chunk."""
    worker: str | None = None
    """The worker running it; None while it waits in the queue."""
    queued_ms: int | None = None
    """When its current attempt was queued (Redis's clock)."""
    ended: bool = False
    """Its terminal entry is written: no more entries will come."""

    def fields(self) -> dict[str, str | int]:
        return {
            "kind": self.kind,
            "created": self.created,
            "usage": int(self.include_usage),
            "job": self.job,
            "owner": self.owner,
            "model": self.model,
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> StreamMeta:
        kind: StreamKind = (
            "text_completion" if fields[b"kind"] == b"text_completion" else "chat.completion.chunk"
        )
        worker = fields.get(b"worker")
        return cls(
            kind,
            int(fields[b"created"]),
            fields[b"usage"] == b"1",
            fields[b"job"].decode(),
            fields[b"owner"].decode(),
            fields.get(b"model", b"").decode(),
            worker.decode() if worker else None,
            int(fields[b"queued"]) if b"queued" in fields else None,
            b"ended" in fields,
        )


@dataclass(frozen=True, slots=True)
class Started:
    worker: str
    prompt_tokens: int
    claimed_ms: int | None = None
    """When the worker claimed the job (Redis's clock): the end of its wait in the queue."""
    choices: int = 1
    """How many answers the stream holds (`n`): each gets its role chunk."""


@dataclass(frozen=True, slots=True)
class Token:
    text: str


@dataclass(frozen=True, slots=True)
class Delta:
    """A rich delta of one choice: text with what plain `Token`s cannot carry (tool-call deltas
    in OpenAI's canonical shape, logprobs, a choice's own finish reason). Computed by the worker
    and stored, so that a resume or a replay re-encodes exactly the same events."""

    index: int = 0
    text: str = ""
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: FinishReason | None = None
    offset: int | None = None
    """Where `text` starts in its choice's answer (characters), given with `logprobs`: the
    legacy completions shape counts each token's `text_offset` from it."""


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    """Choice 0's; with several choices, each one's came in its last `Delta`."""
    prompt_tokens: int
    completion_tokens: int
    """Summed over the choices."""
    choices: int = 1


@dataclass(frozen=True, slots=True)
class Failed:
    error: ErrorBody
    status: int | None = None
    """The HTTP status a non-streaming request gets, where it is not its error's class's own
    (an upstream engine's 4xx)."""


Entry = Started | Token | Delta | Finished | Failed
TERMINAL = (Finished, Failed)

# An entry is one field: its name is the entry's kind, its value the payload (a token's text as
# is, the rare others as JSON). A token entry is written once per generated token, so it is
# kept as small to write, send and parse as Redis allows.
EntryFields = tuple[str, str]


def encode(entry: Entry) -> EntryFields:
    match entry:
        case Token(text):
            return "t", text
        case Delta():
            return "d", _delta_json(entry)
        case Started(worker, prompt_tokens, claimed_ms, choices):
            started: dict[str, Any] = {"w": worker, "p": prompt_tokens, "c": claimed_ms}
            if choices > 1:
                started["n"] = choices
            return "s", json.dumps(started)
        case Finished(reason, prompt_tokens, completion_tokens, choices):
            finished: dict[str, Any] = {"r": reason, "p": prompt_tokens, "c": completion_tokens}
            if choices > 1:
                finished["n"] = choices
            return "f", json.dumps(finished)
        case Failed(error, None):
            return "e", json.dumps(error)
        case Failed(error, status):
            return "e", json.dumps({"error": error, "status": status})


def _delta_json(delta: Delta) -> str:
    fields: dict[str, Any] = {}
    if delta.index:
        fields["i"] = delta.index
    if delta.text:
        fields["c"] = delta.text
    if delta.logprobs:
        fields["lp"] = delta.logprobs
    if delta.tool_calls:
        fields["tc"] = delta.tool_calls
    if delta.finish_reason is not None:
        fields["r"] = delta.finish_reason
    if delta.offset is not None:
        fields["o"] = delta.offset
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def finish_reason(value: str | None) -> FinishReason:
    """A finish reason as sluice names it; an unknown one is an ordinary stop."""
    return next((r for r in FINISH_REASONS if r == value), "stop")


def decode(kind: bytes, payload: bytes) -> Entry:
    if kind == b"t":
        return Token(payload.decode())
    data = json.loads(payload)
    if kind == b"d":
        reason = data.get("r")
        return Delta(
            data.get("i", 0),
            data.get("c", ""),
            data.get("lp"),
            data.get("tc"),
            None if reason is None else finish_reason(reason),
            data.get("o"),
        )
    if kind == b"s":
        return Started(data["w"], data["p"], data.get("c"), data.get("n", 1))
    if kind == b"f":
        return Finished(finish_reason(data["r"]), data["p"], data["c"], data.get("n", 1))
    if kind == b"e":
        return Failed(data["error"], data["status"]) if "status" in data else Failed(data)
    raise ValueError(f"unknown stream entry kind {kind!r}")


def as_fields(entry: Entry) -> dict[FieldT, EncodableT]:
    """The entry as redis-py's XADD takes it."""
    kind, payload = encode(entry)
    return {kind: payload}


def from_fields(fields: Mapping[bytes, bytes]) -> Entry:
    """An entry as redis-py's XRANGE and XREVRANGE give it: a one-field mapping."""
    [(kind, payload)] = fields.items()
    return decode(kind, payload)


def check_complete(first: Entry) -> None:
    """A stream read from its start begins with `Started`, or with the error that ended it
    before it started; anything else means its first entries are gone."""
    if not isinstance(first, Started | Failed):
        raise StreamTruncated("the stream's first entries are gone; it cannot be replayed whole")


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_number(entry_id: str) -> int:
    """Which entry of its stream an id names: a job stream's n-th entry is `<ms>-<n>`
    (shared/lua/lib/fenced_append.lua), and "0-0", before the first, is 0."""
    return int(entry_id.partition("-")[2] or 0)


def check_continuous(last: int, entry_ids: Iterable[str]) -> int:
    """The number of the last of `entry_ids`, which must follow entry number `last` one by one;
    else `RedisFailover`: entries between are missing (a failover lost them, and the writer
    went on after the hole) or come again (the reader saw entries a failover then lost)."""
    for entry_id in entry_ids:
        n = entry_number(entry_id)
        if n != last + 1:
            raise RedisFailover(
                f"Redis failed over and this stream lost entries after entry {last} (next: "
                f"{n}); it cannot go on without a gap"
            )
        last = n
    return last


def response_key(stream_id: str) -> str:
    """Hash: a stored response of `POST /v1/responses` (`api/responses.py`): its owner, its
    request, the conversation so far, and, once its stream has ended, the stream's entries, so
    that it outlives the stream. Expires `SLUICE_RESPONSE_TTL_S` after it is created."""
    return f"{PREFIX}response:{stream_id}"
