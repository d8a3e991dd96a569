"""The API's side of the queue: admit, enqueue and, if nobody picks a job up, withdraw it."""

from __future__ import annotations

import time

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix

from shared.errors import NoWorkers
from shared.protocol import JOB_FUNCTION, QUEUE_NAME, WAKE_CHANNEL, WORKERS_KEY, worker_ttl_ms
from shared.schema import GenerationJob
from shared.settings import Settings

# Removes a job from the queue only if no worker has claimed it (arq marks a claim with the
# in-progress key, set under WATCH). Returns 1 if the job was withdrawn.
_WITHDRAW = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return removed
"""


class JobQueue:
    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._withdraw = redis.register_script(_WITHDRAW)

    async def live_workers(self) -> int:
        now = int(time.time() * 1000)
        count: int = await self._redis.zcount(
            WORKERS_KEY, now - worker_ttl_ms(self._settings.heartbeat_s), "+inf"
        )
        return count

    async def submit(self, job: GenerationJob) -> None:
        if not await self.live_workers():
            raise NoWorkers("no workers are available to serve this request")
        await self._redis.enqueue_job(
            JOB_FUNCTION,
            job.model_dump(),
            _job_id=job.stream_id,
            _queue_name=QUEUE_NAME,
            _expires=self._settings.queue_timeout_s + self._settings.job_timeout_s,
        )
        await self._redis.publish(WAKE_CHANNEL, job.stream_id)

    async def withdraw(self, stream_id: str) -> bool:
        """True if the job was still waiting and is now gone; False if a worker has it."""
        removed = await self._withdraw(
            keys=[in_progress_key_prefix + stream_id, QUEUE_NAME, job_key_prefix + stream_id],
            args=[stream_id],
        )
        return bool(removed)
