"""The API's side of the queue: admit, enqueue, withdraw, retry and cancel jobs."""

from __future__ import annotations

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job

from shared.errors import (
    Cancelled,
    NoWorkers,
    QueueFull,
    SluiceError,
    StreamFinished,
    StreamNotFound,
)
from shared.protocol import (
    CANCEL_CHANNEL,
    JOB_FUNCTION,
    QUEUE_NAME,
    READERS_KEY,
    TERMINAL,
    WAKE_CHANNEL,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
    Failed,
    StreamKind,
    StreamMeta,
    as_fields,
    cancel_key,
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

# Removes a job from the queue only if no worker has claimed it (arq marks a claim with the
# in-progress key, set under WATCH). Returns 1 if the job was withdrawn.
_WITHDRAW = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return removed
"""

# Makes `new` the stream's current attempt if `dead` still is (so that of several relays that
# notice the same lost worker, one retries), and takes `dead` out of arq's hands for good.
_REPLACE = """
if redis.call('HGET', KEYS[1], 'job') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[2])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""


# Admits and enqueues a job in one atomic round trip, writing the job as arq's enqueue_job does
# (the job key, then the queue entry), then wakes the workers. arq's own enqueue_job spends
# three round trips guarding against a duplicate id; ours are fresh.
# KEYS: workers, worker slots, queue, arq job key, stream metadata, readers.
# ARGV: max_queue ('': admit without checking), live since (ms), now (ms), job id, arq payload,
# job TTL (ms), wake channel, stream id, metadata TTL (s), then metadata fields and values.
# Returns {0} when enqueued, {1} with no live worker, {2, waiting} when the queue is full.
_SUBMIT = """
if ARGV[1] ~= '' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')
  if #live == 0 then return {1} end
  local slots = 0
  for _, worker in ipairs(live) do
    slots = slots + (tonumber(redis.call('HGET', KEYS[2], worker)) or 1)
  end
  local waiting = redis.call('ZCARD', KEYS[3]) - slots  -- arq keeps running jobs in the queue
  if waiting >= tonumber(ARGV[1]) then return {2, waiting} end
end
if #ARGV > 9 then
  redis.call('HSET', KEYS[5], unpack(ARGV, 10))
  redis.call('EXPIRE', KEYS[5], ARGV[9])
end
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[8])
redis.call('EXPIRE', KEYS[6], ARGV[9])
redis.call('PSETEX', KEYS[4], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[7], ARGV[4])
return {0}
"""


class JobQueue:
    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._withdraw = redis.register_script(_WITHDRAW)
        self._replace = redis.register_script(_REPLACE)
        self._submit = redis.register_script(_SUBMIT)
        self._meta_ttl_s = int(
            2 * settings.queue_timeout_s + 2 * settings.job_timeout_s + settings.stream_ttl_s
        )

    async def live_workers(self) -> list[str]:
        since = now_ms() - worker_ttl_ms(self._settings.heartbeat_s)
        members = await self._redis.zrangebyscore(WORKERS_KEY, since, "+inf")
        return [m.decode() for m in members]

    async def worker_alive(self, worker_id: str) -> bool:
        beat = await self._redis.zscore(WORKERS_KEY, worker_id)
        return beat is not None and beat >= now_ms() - worker_ttl_ms(self._settings.heartbeat_s)

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
        now = now_ms()
        settings = self._settings
        expires_ms = int((settings.queue_timeout_s + settings.job_timeout_s) * 1000)
        result = await self._submit(
            keys=[
                WORKERS_KEY,
                WORKER_SLOTS_KEY,
                QUEUE_NAME,
                job_key_prefix + arq_job_id,
                meta_key(job.stream_id),
                READERS_KEY,  # whoever asked is reading
            ],
            args=[
                settings.max_queue if admit else "",
                now - worker_ttl_ms(settings.heartbeat_s),
                now,
                arq_job_id,
                serialize_job(JOB_FUNCTION, (job.model_dump(),), {}, None, now),
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

    async def attempt(self, stream_id: str) -> tuple[str, str | None]:
        """The current attempt's arq job id, and the worker running it (None while queued)."""
        job, worker = await self._redis.hmget(meta_key(stream_id), ["job", "worker"])  # type: ignore[misc]
        if job is None:
            raise StreamNotFound(f"stream {stream_id!r} has expired")
        return job.decode(), worker.decode() if worker else None

    async def stream_exists(self, stream_id: str, meta: StreamMeta) -> bool:
        """False once a started stream has expired (its metadata may outlive it briefly)."""
        return meta.worker is None or bool(await self._redis.exists(stream_key(stream_id)))

    async def ended_by(self, stream_id: str, entry_id: str) -> bool:
        """Whether the stream's terminal entry is at or before `entry_id` ("+": anywhere)."""
        last = await self._redis.xrevrange(stream_key(stream_id), max=entry_id, count=1)
        return bool(last) and isinstance(from_fields(last[0][1]), TERMINAL)

    async def withdraw(self, arq_job_id: str) -> bool:
        """True if the job was still waiting and is now gone; False if a worker has it."""
        removed = await self._withdraw(
            keys=[in_progress_key_prefix + arq_job_id, QUEUE_NAME, job_key_prefix + arq_job_id],
            args=[arq_job_id],
        )
        return bool(removed)

    async def retry(self, stream_id: str, dead_job: str, attempt: int) -> bool:
        """Replace an attempt whose worker died with attempt number `attempt`, at most once."""
        new_job = job_id(stream_id, attempt)
        replaced = await self._replace(
            keys=[meta_key(stream_id), QUEUE_NAME, job_key_prefix + dead_job],
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
            pipe.publish(CANCEL_CHANNEL, stream_id)
            await pipe.execute()
        if await self.withdraw(meta.job):
            await self.end_unstarted(stream_id, Cancelled("cancelled before generation started"))

    async def end_unstarted(self, stream_id: str, error: SluiceError) -> None:
        """Write the end of a stream whose job was withdrawn: no worker ever will. Every reader,
        now or resuming later, then ends the same way."""
        ttl = self._settings.stream_ttl_s
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(stream_key(stream_id), as_fields(Failed(error.body())))
            pipe.expire(stream_key(stream_id), ttl)
            pipe.expire(meta_key(stream_id), ttl)
            await pipe.execute()
