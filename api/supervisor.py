"""The one owner of job supervision, whoever is connected.

Every API process runs a `Supervisor`; one of them holds the lease (`SUPERVISOR_KEY`) and does
the work, and another takes over within a lease TTL if that process dies or stalls. Each period
one script, by Redis's clock, looks at every active stream:

- queued, and no client has read it for the resume grace: withdrawn, ended `cancelled`
  (while unread, no worker claims it: it keeps its place in the queue);
- queued longer than `queue_timeout_s`: withdrawn, ended `queue_timeout`;
- lost: its worker's heartbeat stopped, or its worker no longer lists it as running
  (`HELD_KEY`), or it gave the job back (its engine down), or arq let go of an attempt that no
  worker claimed, or a worker took it from the queue and never claimed its stream: tried again
  if no token was written yet (at most `MAX_ATTEMPTS` in all), else ended `worker_lost`;
- running with no reader for the resume grace: the worker is told to stop (`unread`), again
  at every tick until it does; a background response (`pinned`) is never unread;
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
    HELD_KEY,
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

# KEYS: lease, active streams, workers, readers, held attempts.
# ARGV: 1 this process's id, 2 lease TTL (ms), 3 worker TTL (ms), 4 reader TTL (ms),
# 5 resume grace (ms), 6 queue timeout (ms), 7 job deadline (ms), 8 stream TTL (s),
# 9 max attempts, 10-13 key prefixes (meta, stream, in-progress, arq job), 14 cancel channel,
# 15-19 error payloads: unread while queued, queue timeout, worker lost, job timeout, worker
# lost on every attempt, 20 queue prefix (a stream's queue is its model's).
# Returns {} when another process holds the lease; else the lost attempts to retry, as
# stream id, job id, model triples.
SUPERVISE_SCRIPT = (
    REDIS_NOW_LUA
    + FENCED_APPEND_LUA
    + """
local lease, active, workers, readers, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local me, lease_ms, worker_ttl, reader_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local grace, queue_timeout, job_deadline = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local stream_ttl, max_attempts = ARGV[8], tonumber(ARGV[9])
local meta_prefix, stream_prefix, in_progress_prefix, job_prefix = ARGV[10], ARGV[11], ARGV[12],
  ARGV[13]
local cancel_channel, queue_prefix = ARGV[14], ARGV[20]
local unread_while_queued, timed_out_in_queue, worker_lost, timed_out, lost_every_time =
  ARGV[15], ARGV[16], ARGV[17], ARGV[18], ARGV[19]

local holder = redis.call('GET', lease)
if holder and holder ~= me then return {} end
redis.call('SET', lease, me, 'PX', lease_ms)
local now = redis_now_ms()
local retry = {}

for _, id in ipairs(redis.call('ZRANGE', active, 0, -1)) do
  local meta, stream = meta_prefix .. id, stream_prefix .. id
  local m = redis.call('HMGET', meta, 'job', 'worker', 'ended', 'queued', 'started', 'unread',
                       'model', 'pinned')
  local job, worker, ended, queued, started, unread, pinned = m[1], m[2], m[3], m[4], m[5], m[6],
    m[8]
  local queue = queue_prefix .. (m[7] or '')  -- (a stream from before models were routed has none)
  local function finish(payload)
    fenced_append(stream, meta, job, 'e', payload, stream_ttl)
    redis.call('ZREM', active, id)
  end
  -- Its attempt was lost (its worker died, dropped it or gave it back, or arq did): retried
  -- while no token was written and attempts are left, else ended. Retries happen only before
  -- any token, so none was written if the newest entry is a `Started` (or there is none).
  local function lost()
    local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
    if newest and newest[2][1] ~= 's' then finish(worker_lost)
    elseif tonumber(string.match(job, '%.(%d+)$')) >= max_attempts then finish(lost_every_time)
    else
      table.insert(retry, id)
      table.insert(retry, job)
      table.insert(retry, m[7] or '')
    end
  end

  if not job or ended then
    redis.call('ZREM', active, id)
  else
    local seen = redis.call('ZSCORE', readers, id)
    if pinned or (seen and now - tonumber(seen) <= reader_ttl) then
      if unread then redis.call('HDEL', meta, 'unread') end
      unread = nil
    elseif not unread then
      unread = now
      redis.call('HSET', meta, 'unread', now)
    end
    local abandoned = unread and now - tonumber(unread) >= grace
    if not worker then  -- queued
      local claimed = redis.call('GET', in_progress_prefix .. job)
      if claimed then
        -- A worker took it from the queue, and its claim of the stream names it in a moment;
        -- unless that worker died or failed in between.
        if now - tonumber(claimed) > worker_ttl then lost() end
      elseif not redis.call('ZSCORE', queue, job) then
        lost()  -- arq is done with an attempt no worker claimed (a failed claim, say)
      elseif abandoned or now - tonumber(queued) >= queue_timeout then
        redis.call('ZREM', queue, job)
        redis.call('DEL', job_prefix .. job)
        finish(abandoned and unread_while_queued or timed_out_in_queue)
      end
    else  -- running
      local beat = redis.call('ZSCORE', workers, worker)
      local listed = tonumber(redis.call('ZSCORE', held, job) or started)
      if not beat or now - tonumber(beat) > worker_ttl then
        lost()
      elseif now - math.max(listed, tonumber(started)) > worker_ttl then
        lost()  -- its worker lives but no longer runs it
      elseif now - tonumber(started) > job_deadline then
        finish(timed_out)
      elseif abandoned then
        redis.call('PUBLISH', cancel_channel, id .. ' unread')
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
            keys=[SUPERVISOR_KEY, ACTIVE_KEY, WORKERS_KEY, READERS_KEY, HELD_KEY],
            args=self._args,
        )
        for raw_id, raw_job, raw_model in zip(retry[::3], retry[1::3], retry[2::3], strict=True):
            stream_id, dead_job = raw_id.decode(), raw_job.decode()
            log.warning("stream %s lost its worker before any token; retrying", stream_id)
            await self._queue.retry(
                stream_id, dead_job, attempt_number(dead_job) + 1, raw_model.decode()
            )
