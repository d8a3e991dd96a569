"""The API's side of the queue: admit, enqueue, withdraw, retry and cancel jobs."""

from __future__ import annotations

import dataclasses
import hmac

from arq.connections import ArqRedis

from api.auth import KeyUse, Principal, rate_limited
from api.catalog import no_such_model
from shared.arq_internals import in_progress_key, job_key, job_record
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
    ACTIVE_KEY,
    CANCEL_CHANNEL,
    FENCED_APPEND_LUA,
    JOB_FUNCTION,
    KEY_REQUESTS_PREFIX,
    KEY_STREAMS_PREFIX,
    KEY_TOKENS_PREFIX,
    MODELS_KEY,
    READERS_KEY,
    REDIS_NOW_LUA,
    TERMINAL,
    WINDOW_LUA,
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
    wake_channel,
    worker_ttl_ms,
)
from shared.schema import GenerationJob
from shared.settings import Settings

# (The `type: ignore[misc]`s below: redis-py types hash commands as returning "Awaitable | value"
# for its sync and async clients alike.)

# Ends a stream whose current attempt is still waiting in the queue: takes the job out of arq's
# hands unless a worker has claimed it (arq marks a claim with the in-progress key), then
# appends the terminal entry, fenced like any append. Returns 1 if the stream was ended here.
# KEYS: in-progress key, queue, arq job key, stream, metadata. ARGV: job id, payload, TTL.
WITHDRAW_SCRIPT = (
    FENCED_APPEND_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if fenced_append(KEYS[4], KEYS[5], ARGV[1], 'e', ARGV[2], ARGV[3]) == 0 then return 0 end
return 1
"""
)

# Puts an attempt in its model's queue, writing it as arq's enqueue_job does (the job key, then
# the queue entry), marks its stream active and queued since `now`, and wakes the model's
# workers. arq's own enqueue_job spends three round trips guarding against a duplicate id;
# ours are fresh.
ENQUEUE_LUA = """
local function enqueue(meta, queue, job_key, active, stream_id, job, record, job_ttl_ms,
                       meta_ttl_s, wake, now)
  redis.call('HSET', meta, 'queued', now)
  redis.call('EXPIRE', meta, meta_ttl_s)
  redis.call('ZADD', active, 'NX', now, stream_id)
  redis.call('EXPIRE', active, meta_ttl_s)
  redis.call('PSETEX', job_key, job_ttl_ms, record)
  redis.call('ZADD', queue, now, job)
  redis.call('PUBLISH', wake, job)
end
"""

# Makes `new` the stream's current attempt if `dead` still is and the stream has not ended (so
# that a late retry cannot revive a stream), takes `dead` out of arq's hands for good, and
# queues `new`, in one step: no moment exists where the stream's attempt is in no queue. From
# then on the fence refuses anything the dead attempt still appends. Returns 1 if retried.
# KEYS: metadata, the model's queue, the dead attempt's arq job key, the new one's, active
# streams. ARGV: dead job id, new job id, the new job's arq record, job TTL (ms), metadata TTL
# (s), the model's wake channel, stream id.
RETRY_SCRIPT = (
    REDIS_NOW_LUA
    + ENQUEUE_LUA
    + """
local current = redis.call('HMGET', KEYS[1], 'job', 'ended')
if current[1] ~= ARGV[1] or current[2] then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[2])
redis.call('HDEL', KEYS[1], 'worker', 'started')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
enqueue(KEYS[1], KEYS[2], KEYS[4], KEYS[5], ARGV[7], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
        redis_now_ms())
return 1
"""
)

# Marks a stream cancelled, for the worker's next append and its claim, and tells its worker at
# once. KEYS: metadata. ARGV: cancel channel, message.
CANCEL_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'cancel', 1) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
"""


# Admits and enqueues a job in one atomic round trip, then wakes the model's workers. Times are
# Redis's. Being one script, two API processes cannot both admit past a limit. Capacity is the
# model's own: the live workers of its serving set (not those of other models, nor those whose
# backend is unavailable), their slots, and its queue.
# KEYS: the model's serving set, worker slots, the model's queue, arq job key, stream metadata,
# readers, active streams, the owner's requests, tokens and open streams (see `KEY_*_PREFIX`),
# models, workers, workers' models.
# ARGV: max_queue, worker TTL (ms), job id, arq payload, job TTL (ms), wake channel, stream id,
# metadata TTL (s), the owner's requests per minute, tokens per minute and open streams (0: no
# limit), the model, then metadata fields and values.
# Returns {0, requests, tokens, ms to the window's next minute} when enqueued (the owner's use
# of its windows, this request included), {1} with no live worker for the model, {2, waiting}
# when its queue is full, {3, limit, retry after (ms)} when the owner is at `limit`, {4} for a
# model no worker ever announced, {5} when the model's live workers all report their backend
# unavailable (an engine down or hung: they beat, but not in its serving set).
_SUBMIT = (
    REDIS_NOW_LUA
    + WINDOW_LUA
    + ENQUEUE_LUA
    + """
local now = redis_now_ms()
local to_next_minute = 60000 - now % 60000
local function wait_ms(used, previous, current, limit)
  if previous > 0 and current + 1 <= limit then
    return math.min(math.ceil((used + 1 - limit) * 60000 / previous), to_next_minute)
  end
  return to_next_minute
end
if redis.call('HEXISTS', KEYS[11], ARGV[12]) == 0 then return {4} end
local since = now - tonumber(ARGV[2])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf')
if #live == 0 then
  -- No worker can serve it; one that is alive for its model has an engine that does not answer.
  for _, worker in ipairs(redis.call('ZRANGEBYSCORE', KEYS[12], since, '+inf')) do
    if redis.call('HGET', KEYS[13], worker) == ARGV[12] then return {5} end
  end
  return {1}
end
local rpm, tpm, max_streams = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
if rpm > 0 then
  local used, previous, current = window_used(KEYS[8], now)
  if used + 1 > rpm then return {3, 'requests', wait_ms(used, previous, current, rpm)} end
end
if tpm > 0 then
  local used, previous, current = window_used(KEYS[9], now)
  if used >= tpm then return {3, 'tokens', wait_ms(used, previous, current, tpm)} end
end
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now - tonumber(ARGV[8]) * 1000)
  if redis.call('ZCARD', KEYS[10]) >= max_streams then return {3, 'streams', 1000} end
end
local slots = 0
for _, worker in ipairs(live) do
  slots = slots + (tonumber(redis.call('HGET', KEYS[2], worker)) or 1)
end
local waiting = redis.call('ZCARD', KEYS[3]) - slots  -- arq keeps running jobs in the queue
if waiting >= tonumber(ARGV[1]) then return {2, waiting} end
window_add(KEYS[8], now, 1)
redis.call('ZADD', KEYS[10], now, ARGV[7])
redis.call('EXPIRE', KEYS[10], ARGV[8])
redis.call('HSET', KEYS[5], unpack(ARGV, 13))
redis.call('ZADD', KEYS[6], now, ARGV[7])  -- whoever asked is reading
redis.call('EXPIRE', KEYS[6], ARGV[8])
enqueue(KEYS[5], KEYS[3], KEYS[4], KEYS[7], ARGV[7], ARGV[3], ARGV[4], ARGV[5], ARGV[8], ARGV[6],
        now)
local requests = window_used(KEYS[8], now)
local tokens = window_used(KEYS[9], now)
return {0, math.ceil(requests), math.ceil(tokens), to_next_minute, now}
"""
)

UPSTREAM_DOWN = "the model's engine is not available; try again later"

# The workers whose heartbeat is fresh by Redis's clock. KEYS: workers. ARGV: TTL (ms).
_LIVE_WORKERS = (
    REDIS_NOW_LUA
    + "return redis.call('ZRANGEBYSCORE', KEYS[1], redis_now_ms() - tonumber(ARGV[1]), '+inf')"
)


class JobQueue:
    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._withdraw = redis.register_script(WITHDRAW_SCRIPT)
        self._retry = redis.register_script(RETRY_SCRIPT)
        self._cancel = redis.register_script(CANCEL_SCRIPT)
        self._submit = redis.register_script(_SUBMIT)
        self._live_workers = redis.register_script(_LIVE_WORKERS)
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
            "cap": entry_cap(job.max_tokens),
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
                ACTIVE_KEY,
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
                *(item for pair in fields.items() for item in pair),
            ],
        )
        match result:
            case [1]:
                raise NoWorkers(
                    "no workers are available to serve this request",
                    retry_after_s=settings.retry_after_s,
                )
            case [5]:
                raise UpstreamUnavailable(UPSTREAM_DOWN, retry_after_s=settings.retry_after_s)
            case [4]:
                raise no_such_model(model)
            case [2, int(waiting)]:
                raise QueueFull(
                    f"{waiting} requests are waiting for a worker; try again shortly",
                    retry_after_s=settings.retry_after_s,
                )
            case [3, bytes(limit), int(wait_ms)]:
                raise rate_limited(limit.decode(), limits, wait_ms)
        _, requests, tokens, to_next_minute, queued_ms = (int(n) for n in result)
        meta = dataclasses.replace(meta, queued_ms=queued_ms)
        return meta, KeyUse(owner.limits, requests, tokens, to_next_minute)

    @staticmethod
    def _record(job: GenerationJob) -> bytes:
        return job_record(JOB_FUNCTION, (job.model_dump(),), now_ms())

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
                job_key(dead_job),
                job_key(new_job),
                ACTIVE_KEY,
            ],
            args=[
                dead_job,
                new_job,
                self._record(job),
                self._job_ttl_ms,
                self._meta_ttl_s,
                wake_channel(model),
                stream_id,
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
