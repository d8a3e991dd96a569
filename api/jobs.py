"""The API's side of the queue: admit, enqueue, withdraw, retry and cancel jobs."""

from __future__ import annotations

import dataclasses
import hmac

from arq.connections import ArqRedis

from api.auth import KeyUse, Principal, rate_limited
from api.catalog import no_such_model
from shared.arq_internals import in_progress_key, job_key, job_record
from shared.batched_script import BatchedScript
from shared.errors import (
    Cancelled,
    NoWorkers,
    QueueFull,
    SluiceError,
    StreamFinished,
    StreamNotFound,
    UpstreamUnavailable,
)
from shared.protocol import (
    CANCEL_CHANNEL,
    JOB_FUNCTION,
    KEY_REQUESTS_PREFIX,
    KEY_STREAMS_PREFIX,
    KEY_TOKENS_PREFIX,
    MODELS_KEY,
    READERS_KEY,
    TERMINAL,
    WORKER_MODELS_KEY,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
    Failed,
    StreamKind,
    StreamMeta,
    encode,
    entry_cap,
    from_fields,
    job_id,
    meta_key,
    now_ms,
    queue_name,
    serving_key,
    stream_key,
    waiting_key,
    wake_channel,
    worker_ttl_ms,
)
from shared.schema import GenerationJob
from shared.scripts import lua
from shared.settings import Settings

# (The `type: ignore[misc]`s below: redis-py types hash commands as returning "Awaitable | value"
# for its sync and async clients alike.)

UPSTREAM_DOWN = "the model's engine is not available; try again later"


class JobQueue:
    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._withdraw = redis.register_script(lua("withdraw"))
        self._retry = redis.register_script(lua("retry"))
        self._cancel = redis.register_script(lua("cancel"))
        self._submit = BatchedScript(redis, lua("submit"))
        self._live_workers = redis.register_script(lua("live_workers"))
        self._meta_ttl_s = int(
            2 * settings.queue_timeout_s + 2 * settings.job_timeout_s + settings.stream_ttl_s
        )

    @property
    def redis(self) -> ArqRedis:
        return self._redis

    async def live_workers(self) -> list[str]:
        members = await self._live_workers(
            keys=[WORKERS_KEY], args=[worker_ttl_ms(self._settings.heartbeat_s)]
        )
        return [m.decode() for m in members]

    async def submit(
        self,
        job: GenerationJob,
        kind: StreamKind,
        include_usage: bool,
        owner: Principal,
        model: str,
        *,
        pinned: bool = False,
        keep_s: int | None = None,
    ) -> tuple[StreamMeta, KeyUse]:
        """Queue the stream's first attempt for `model`: 404 if no worker ever served it, 503
        with no live worker that can, 429 with more than `max_queue` jobs waiting for its slots
        or with `owner` at one of its limits. `pinned`: it runs whether or not anyone reads
        it; `keep_s`: its stream lives that long after its end, not `SLUICE_STREAM_TTL_S`."""
        settings = self._settings
        meta = StreamMeta(
            kind, now_ms() // 1000, include_usage, job_id(job.stream_id, 1), owner.name, model
        )
        fields: dict[str, str | int] = {
            **meta.fields(),
            "payload": job.model_dump_json(),
            "cap": entry_cap(job.max_tokens, job.n),
        }
        if pinned:
            fields["pinned"] = 1
        if keep_s is not None:
            fields["keep"] = keep_s
        limits = owner.limits
        result: list[int | bytes] = await self._submit(
            keys=[
                serving_key(model),
                WORKER_SLOTS_KEY,
                queue_name(model),
                job_key(meta.job),
                meta_key(job.stream_id),
                READERS_KEY,
                waiting_key(model),
                KEY_REQUESTS_PREFIX + owner.name,
                KEY_TOKENS_PREFIX + owner.name,
                KEY_STREAMS_PREFIX + owner.name,
                MODELS_KEY,
                WORKERS_KEY,
                WORKER_MODELS_KEY,
            ],
            args=[
                settings.max_queue,
                worker_ttl_ms(settings.heartbeat_s),
                meta.job,
                self._record(job),
                self._job_ttl_ms,
                wake_channel(model),
                job.stream_id,
                self._meta_ttl_s,
                limits.rpm or 0,
                limits.tpm or 0,
                limits.max_streams or 0,
                model,
                self._queue_timeout_ms,
                *(item for pair in fields.items() for item in pair),
            ],
        )
        match result:
            case [b"no_workers"]:
                raise NoWorkers(
                    "no workers are available to serve this request",
                    retry_after_s=settings.retry_after_s,
                )
            case [b"engine_down"]:
                raise UpstreamUnavailable(UPSTREAM_DOWN, retry_after_s=settings.retry_after_s)
            case [b"unknown_model"]:
                raise no_such_model(model)
            case [b"queue_full", int(waiting)]:
                raise QueueFull(
                    f"{waiting} requests are waiting for a worker; try again shortly",
                    retry_after_s=settings.retry_after_s,
                )
            case [b"rate_limited", bytes(limit), int(wait_ms)]:
                raise rate_limited(limit.decode(), limits, wait_ms)
        requests, tokens, to_next_minute, queued_ms = (int(n) for n in result[1:])
        meta = dataclasses.replace(meta, queued_ms=queued_ms)
        return meta, KeyUse(owner.limits, requests, tokens, to_next_minute)

    @staticmethod
    def _record(job: GenerationJob) -> bytes:
        return job_record(JOB_FUNCTION, (job.model_dump(),), now_ms())

    @property
    def _queue_timeout_ms(self) -> int:
        return int(self._settings.queue_timeout_s * 1000)

    @property
    def _job_ttl_ms(self) -> int:
        return int((self._settings.queue_timeout_s + self._settings.job_timeout_s) * 1000)

    async def meta(self, stream_id: str, reader: Principal) -> StreamMeta:
        """The stream's metadata, if it exists and belongs to `reader`'s key: another key's
        stream is answered exactly as one that does not exist."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(meta_key(stream_id))  # type: ignore[misc]
        meta = StreamMeta.from_fields(fields) if fields else None
        if meta is None or not hmac.compare_digest(meta.owner, reader.name):
            raise StreamNotFound(f"no stream {stream_id!r} (unknown, or expired)")
        return meta

    async def stream_exists(self, stream_id: str, meta: StreamMeta) -> bool:
        """False once an ended stream has expired (its metadata may outlive it briefly). One
        still going exists even before its first entry is stored (a worker has just claimed
        it, its `Started` is on its way)."""
        return not meta.ended or bool(await self._redis.exists(stream_key(stream_id)))

    async def ended_by(self, stream_id: str, entry_id: str) -> bool:
        """Whether the stream's terminal entry is at or before `entry_id` ("+": anywhere)."""
        last = await self._redis.xrevrange(stream_key(stream_id), max=entry_id, count=1)
        return bool(last) and isinstance(from_fields(last[0][1]), TERMINAL)

    async def withdraw(self, stream_id: str, meta: StreamMeta, error: SluiceError) -> bool:
        """End a stream whose job still waits in the queue with `error`: every reader, now or
        resuming later, ends the same way. False if a worker has the job (or it ended)."""
        arq_job_id = meta.job
        _, payload = encode(Failed(error.body()))
        ended = await self._withdraw(
            keys=[
                in_progress_key(arq_job_id),
                queue_name(meta.model),
                waiting_key(meta.model),
                job_key(arq_job_id),
                stream_key(stream_id),
                meta_key(stream_id),
            ],
            args=[arq_job_id, payload, self._settings.stream_ttl_s],
        )
        return bool(ended)

    async def retry(self, stream_id: str, dead_job: str, attempt: int, model: str) -> bool:
        """Replace an attempt whose worker lost it with attempt number `attempt`, at most once,
        in the queue of the model the stream was routed to."""
        new_job = job_id(stream_id, attempt)
        payload = await self._redis.hget(meta_key(stream_id), "payload")  # type: ignore[misc]
        if payload is None:  # expired meanwhile
            return False
        job = GenerationJob.model_validate_json(payload)
        retried = await self._retry(
            keys=[
                meta_key(stream_id),
                queue_name(model),
                waiting_key(model),
                job_key(dead_job),
                job_key(new_job),
            ],
            args=[
                dead_job,
                new_job,
                self._record(job),
                self._job_ttl_ms,
                self._meta_ttl_s,
                wake_channel(model),
                stream_id,
                self._queue_timeout_ms,
            ],
        )
        return bool(retried)

    async def cancel(self, stream_id: str, reader: Principal) -> StreamMeta:
        """Stop a stream's generation, wherever it runs; a stream still queued never starts."""
        meta = await self.meta(stream_id, reader)
        if await self.ended_by(stream_id, "+"):
            raise StreamFinished(f"stream {stream_id!r} has already finished")
        await self._cancel(
            keys=[meta_key(stream_id)], args=[CANCEL_CHANNEL, f"{stream_id} cancelled"]
        )
        await self.withdraw(stream_id, meta, Cancelled("cancelled before generation started"))
        return meta
