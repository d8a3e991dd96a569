"""The API's side of the queue: admit, enqueue, withdraw, retry and cancel jobs."""

from __future__ import annotations

from arq.connections import ArqRedis

from shared.arq_internals import in_progress_key, job_key, job_record
from shared.errors import (
    Cancelled,
    NoWorkers,
    QueueFull,
    SluiceError,
    StreamFinished,
    StreamNotFound,
)
from shared.protocol import (
    ACTIVE_KEY,
    CANCEL_CHANNEL,
    FENCED_APPEND_LUA,
    JOB_FUNCTION,
    QUEUE_NAME,
    READERS_KEY,
    REDIS_NOW_LUA,
    TERMINAL,
    WAKE_CHANNEL,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
    Failed,
    StreamKind,
    StreamMeta,
    cancel_key,
    encode,
    from_fields,
    job_id,
    meta_key,
    now_ms,
    stream_key,
    worker_ttl_ms,
)
from shared.schema import GenerationJob
from shared.settings import Settings

# (The `type: ignore[misc]`s below: redis-py types hash commands as returning "Awaitable | value"
# for its sync and async clients alike.)

# Ends a stream whose current attempt is still waiting in the queue: takes the job out of arq's
# hands unless a worker has claimed it (arq marks a claim with the in-progress key), then
# appends the terminal entry, fenced like any append. Returns 1 if the stream was ended here.
# KEYS: in-progress key, queue, arq job key, stream, metadata. ARGV: job id, payload, MAXLEN, TTL.
WITHDRAW_SCRIPT = (
    FENCED_APPEND_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if fenced_append(KEYS[4], KEYS[5], ARGV[1], 'e', ARGV[2], ARGV[3], ARGV[4]) == 0 then return 0 end
return 1
"""
)

# Makes `new` the stream's current attempt if `dead` still is and the stream has not ended (so
# that a late retry cannot revive a stream), and takes `dead` out of arq's hands for good. From
# then on the fence refuses anything the dead attempt still appends.
REPLACE_SCRIPT = """
local current = redis.call('HMGET', KEYS[1], 'job', 'ended')
if current[1] ~= ARGV[1] or current[2] then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[2])
redis.call('HDEL', KEYS[1], 'worker', 'started')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""


# Admits and enqueues a job in one atomic round trip, writing the job as arq's enqueue_job does
# (the job key, then the queue entry), then wakes the workers. arq's own enqueue_job spends
# three round trips guarding against a duplicate id; ours are fresh. Times are Redis's.
# KEYS: workers, worker slots, queue, arq job key, stream metadata, readers, active streams.
# ARGV: max_queue ('': admit without checking), worker TTL (ms), job id, arq payload,
# job TTL (ms), wake channel, stream id, metadata TTL (s), then metadata fields and values.
# Returns {0} when enqueued, {1} with no live worker, {2, waiting} when the queue is full.
_SUBMIT = (
    REDIS_NOW_LUA
    + """
local now = redis_now_ms()
if ARGV[1] ~= '' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
  if #live == 0 then return {1} end
  local slots = 0
  for _, worker in ipairs(live) do
    slots = slots + (tonumber(redis.call('HGET', KEYS[2], worker)) or 1)
  end
  local waiting = redis.call('ZCARD', KEYS[3]) - slots  -- arq keeps running jobs in the queue
  if waiting >= tonumber(ARGV[1]) then return {2, waiting} end
end
if #ARGV > 8 then redis.call('HSET', KEYS[5], unpack(ARGV, 9)) end
redis.call('HSET', KEYS[5], 'queued', now)
redis.call('EXPIRE', KEYS[5], ARGV[8])
redis.call('ZADD', KEYS[6], now, ARGV[7])
redis.call('EXPIRE', KEYS[6], ARGV[8])
redis.call('ZADD', KEYS[7], 'NX', now, ARGV[7])
redis.call('EXPIRE', KEYS[7], ARGV[8])
redis.call('PSETEX', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[3], now, ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[3])
return {0}
"""
)

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
        self._replace = redis.register_script(REPLACE_SCRIPT)
        self._submit = redis.register_script(_SUBMIT)
        self._live_workers = redis.register_script(_LIVE_WORKERS)
        self._meta_ttl_s = int(
            2 * settings.queue_timeout_s + 2 * settings.job_timeout_s + settings.stream_ttl_s
        )

    async def live_workers(self) -> list[str]:
        members = await self._live_workers(
            keys=[WORKERS_KEY], args=[worker_ttl_ms(self._settings.heartbeat_s)]
        )
        return [m.decode() for m in members]

    async def submit(self, job: GenerationJob, kind: StreamKind, include_usage: bool) -> StreamMeta:
        """Queue the stream's first attempt: 503 with no live worker, 429 with more than
        `max_queue` jobs waiting for a slot."""
        meta = StreamMeta(kind, now_ms() // 1000, include_usage, job_id(job.stream_id, 1))
        fields = {**meta.fields(), "payload": job.model_dump_json()}
        await self._enqueue(meta.job, job, admit=True, meta_fields=fields)
        return meta

    async def _enqueue(
        self,
        arq_job_id: str,
        job: GenerationJob,
        *,
        admit: bool,
        meta_fields: dict[str, str | int] | None = None,
    ) -> None:
        settings = self._settings
        expires_ms = int((settings.queue_timeout_s + settings.job_timeout_s) * 1000)
        result = await self._submit(
            keys=[
                WORKERS_KEY,
                WORKER_SLOTS_KEY,
                QUEUE_NAME,
                job_key(arq_job_id),
                meta_key(job.stream_id),
                READERS_KEY,  # whoever asked is reading
                ACTIVE_KEY,
            ],
            args=[
                settings.max_queue if admit else "",
                worker_ttl_ms(settings.heartbeat_s),
                arq_job_id,
                job_record(JOB_FUNCTION, (job.model_dump(),), now_ms()),
                expires_ms,
                WAKE_CHANNEL,
                job.stream_id,
                self._meta_ttl_s,
                *(item for pair in (meta_fields or {}).items() for item in pair),
            ],
        )
        if result[0] == 1:
            raise NoWorkers("no workers are available to serve this request")
        if result[0] == 2:
            raise QueueFull(
                f"{result[1]} requests are waiting for a worker; try again shortly",
                retry_after_s=settings.retry_after_s,
            )

    async def meta(self, stream_id: str) -> StreamMeta | None:
        fields: dict[bytes, bytes] = await self._redis.hgetall(meta_key(stream_id))  # type: ignore[misc]
        return StreamMeta.from_fields(fields) if fields else None

    async def stream_exists(self, stream_id: str, meta: StreamMeta) -> bool:
        """False once a started stream has expired (its metadata may outlive it briefly)."""
        return meta.worker is None or bool(await self._redis.exists(stream_key(stream_id)))

    async def ended_by(self, stream_id: str, entry_id: str) -> bool:
        """Whether the stream's terminal entry is at or before `entry_id` ("+": anywhere)."""
        last = await self._redis.xrevrange(stream_key(stream_id), max=entry_id, count=1)
        return bool(last) and isinstance(from_fields(last[0][1]), TERMINAL)

    async def withdraw(self, stream_id: str, arq_job_id: str, error: SluiceError) -> bool:
        """End a stream whose job still waits in the queue with `error`: every reader, now or
        resuming later, ends the same way. False if a worker has the job (or it ended)."""
        _, payload = encode(Failed(error.body()))
        ended = await self._withdraw(
            keys=[
                in_progress_key(arq_job_id),
                QUEUE_NAME,
                job_key(arq_job_id),
                stream_key(stream_id),
                meta_key(stream_id),
            ],
            args=[arq_job_id, payload, self._settings.stream_maxlen, self._settings.stream_ttl_s],
        )
        return bool(ended)

    async def retry(self, stream_id: str, dead_job: str, attempt: int) -> bool:
        """Replace an attempt whose worker died with attempt number `attempt`, at most once."""
        new_job = job_id(stream_id, attempt)
        replaced = await self._replace(
            keys=[meta_key(stream_id), QUEUE_NAME, job_key(dead_job)],
            args=[dead_job, new_job],
        )
        if not replaced:
            return False
        payload = await self._redis.hget(meta_key(stream_id), "payload")  # type: ignore[misc]
        await self._enqueue(new_job, GenerationJob.model_validate_json(payload), admit=False)
        return True

    async def cancel(self, stream_id: str) -> None:
        """Stop a stream's generation, wherever it runs; a stream still queued never starts."""
        meta = await self.meta(stream_id)
        if meta is None:
            raise StreamNotFound(f"no stream {stream_id!r} (unknown, or expired)")
        if await self.ended_by(stream_id, "+"):
            raise StreamFinished(f"stream {stream_id!r} has already finished")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(cancel_key(stream_id), 1, ex=self._meta_ttl_s)
            pipe.publish(CANCEL_CHANNEL, f"{stream_id} cancelled")
            await pipe.execute()
        await self.withdraw(stream_id, meta.job, Cancelled("cancelled before generation started"))
