"""The one owner of job supervision, whoever is connected.

Every API process runs a `Supervisor`; one of them holds the lease (`SUPERVISOR_KEY`) and does
the work, and another takes over within a lease TTL if that process dies or stalls. Each period
one script, by Redis's clock, looks at every active stream:

- queued, and no client has read it for the resume grace: withdrawn, ended `cancelled`;
- queued longer than `queue_timeout_s`: withdrawn, ended `queue_timeout`;
- running on a worker whose heartbeat stopped (or that gave the job back, its engine down):
  tried again if no token was written yet (at most `MAX_ATTEMPTS` in all), else ended
  `worker_lost`;
- running with no reader for the resume grace: the worker is told to stop (`unread`);
- running past `job_timeout_s` (plus a worker TTL, so the worker's own timeout comes first):
  ended `generation_failed`.

Every end is a fenced append (`FENCED_APPEND_LUA`), so the worker that was presumed dead cannot
write after it, and a stale supervisor's decision cannot land after a newer one's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from redis.asyncio import Redis

from api.jobs import JobQueue
from shared.arq_internals import in_progress_key, job_key
from shared.errors import Cancelled, GenerationFailed, QueueTimeout, SluiceError, WorkerLost
from shared.protocol import (
    ACTIVE_KEY,
    CANCEL_CHANNEL,
    FENCED_APPEND_LUA,
    MAX_ATTEMPTS,
    QUEUE_PREFIX,
    READERS_KEY,
    REDIS_NOW_LUA,
    SUPERVISOR_KEY,
    WORKERS_KEY,
    Failed,
    attempt_number,
    encode,
    meta_key,
    stream_key,
    worker_ttl_ms,
)
from shared.settings import Settings

log = logging.getLogger("sluice.api")

# KEYS: lease, active streams, workers, readers.
# ARGV: 1 this process's id, 2 lease TTL (ms), 3 worker TTL (ms), 4 reader TTL (ms),
# 5 resume grace (ms), 6 queue timeout (ms), 7 job deadline (ms), 8 MAXLEN, 9 stream TTL (s),
# 10 max attempts, 11-14 key prefixes (meta, stream, in-progress, arq job), 15 cancel channel,
# 16-20 error payloads: unread while queued, queue timeout, worker lost, job timeout, worker
# lost on every attempt, 21 queue prefix (a stream's queue is its model's).
# Returns {} when another process holds the lease; else the lost attempts to retry, as
# stream id, job id, model triples.
SUPERVISE_SCRIPT = (
    REDIS_NOW_LUA
    + FENCED_APPEND_LUA
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = redis_now_ms()
local retry = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local meta = ARGV[11] .. id
  local stream = ARGV[12] .. id
  local m = redis.call('HMGET', meta, 'job', 'worker', 'ended', 'queued', 'started', 'unread',
                       'model')
  local job, worker, ended, queued, started, unread = m[1], m[2], m[3], m[4], m[5], m[6]
  local model = m[7] or ''  -- (a stream from before models were routed has none)
  local function finish(payload)
    fenced_append(stream, meta, job, 'e', payload, ARGV[8], ARGV[9])
    redis.call('ZREM', KEYS[2], id)
  end
  if not job or ended then
    redis.call('ZREM', KEYS[2], id)
  else
    local seen = redis.call('ZSCORE', KEYS[4], id)
    if seen and now - tonumber(seen) <= tonumber(ARGV[4]) then
      if unread then redis.call('HDEL', meta, 'unread') end
      unread = nil
    elseif not unread then
      unread = now
      redis.call('HSET', meta, 'unread', now)
    end
    local abandoned = unread and now - tonumber(unread) >= tonumber(ARGV[5])
    if not worker then
      if redis.call('EXISTS', ARGV[13] .. job) == 0 then  -- not being claimed right now
        local payload = nil
        if abandoned then payload = ARGV[16]
        elseif queued and now - tonumber(queued) >= tonumber(ARGV[6]) then payload = ARGV[17] end
        if payload then
          redis.call('ZREM', ARGV[21] .. model, job)
          redis.call('DEL', ARGV[14] .. job)
          finish(payload)
        end
      end
    else
      local beat = redis.call('ZSCORE', KEYS[3], worker)
      if not beat or now - tonumber(beat) > tonumber(ARGV[3]) then
        local attempt = tonumber(string.match(job, '%.(%d+)$'))
        -- Retries happen only before any token, so no token was written if the newest entry
        -- is a `Started` (or there is none).
        local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
        if newest and newest[2][1] ~= 's' then finish(ARGV[18])
        elseif attempt >= tonumber(ARGV[10]) then finish(ARGV[20])
        else
          table.insert(retry, id)
          table.insert(retry, job)
          table.insert(retry, model)
        end
      elseif started and now - tonumber(started) > tonumber(ARGV[7]) then
        finish(ARGV[19])
      elseif abandoned then
        redis.call('PUBLISH', ARGV[15], id .. ' unread')
      end
    end
  end
end
return retry
"""
)


def _payload(error: SluiceError) -> str:
    return encode(Failed(error.body()))[1]


class Supervisor:
    def __init__(self, redis: Redis, queue: JobQueue, settings: Settings) -> None:
        self._redis = redis
        self._queue = queue
        self._settings = settings
        self._script = redis.register_script(SUPERVISE_SCRIPT)
        self.instance_id = uuid.uuid4().hex
        worker_ttl = worker_ttl_ms(settings.heartbeat_s)
        self._args: list[str | int] = [
            self.instance_id,
            max(int(settings.supervise_s * 5000), 2000),
            worker_ttl,
            worker_ttl,  # readers refresh as often as workers beat
            int(settings.resume_grace_s * 1000),
            int(settings.queue_timeout_s * 1000),
            int(settings.job_timeout_s * 1000) + worker_ttl,
            settings.stream_maxlen,
            settings.stream_ttl_s,
            MAX_ATTEMPTS,
            meta_key(""),
            stream_key(""),
            in_progress_key(""),
            job_key(""),
            CANCEL_CHANNEL,
            _payload(Cancelled("no client was reading; the request was withdrawn")),
            _payload(
                QueueTimeout(
                    f"no worker started this request within {settings.queue_timeout_s:g} s"
                )
            ),
            _payload(WorkerLost("the worker generating this stream stopped")),
            _payload(
                GenerationFailed(
                    f"generation ran past the {settings.job_timeout_s:g} s job timeout"
                )
            ),
            _payload(
                WorkerLost(f"the worker generating this stream stopped, {MAX_ATTEMPTS} times")
            ),
            QUEUE_PREFIX,
        ]

    async def run(self) -> None:
        """Supervise every `supervise_s` for ever (a `SupervisedLoop` restarts it if it fails)."""
        while True:
            await self.tick()
            await asyncio.sleep(self._settings.supervise_s)

    async def tick(self) -> None:
        retry = await self._script(
            keys=[SUPERVISOR_KEY, ACTIVE_KEY, WORKERS_KEY, READERS_KEY],
            args=self._args,
        )
        for raw_id, raw_job, raw_model in zip(retry[::3], retry[1::3], retry[2::3], strict=True):
            stream_id, dead_job = raw_id.decode(), raw_job.decode()
            log.warning("stream %s lost its worker before any token; retrying", stream_id)
            await self._queue.retry(
                stream_id, dead_job, attempt_number(dead_job) + 1, raw_model.decode()
            )
