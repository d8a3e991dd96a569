--! include redis_now
--! include fenced_append
--! include attempts

-- The supervisor's tick: decides, by Redis's clock, what becomes of every active stream. Only
-- the holder of the lease decides; another API process takes over within a lease TTL.
-- KEYS: 1 lease, 2 active streams, 3 workers, 4 readers, 5 held attempts.
-- ARGV: 1 this process's id, 2 lease TTL (ms), 3 worker TTL (ms), 4 reader TTL (ms), 5 resume
--       grace (ms), 6 queue timeout (ms), 7 job deadline (ms), 8 stream TTL (s), 9 max attempts,
--       10-13 key prefixes: metadata, stream, in-progress, arq job; 14 cancel channel,
--       15-19 error payloads: unread while queued, queue timeout, worker lost, job timeout,
--       worker lost on every attempt; 20 queue prefix.
-- Returns {} if another process holds the lease; else the lost attempts to retry, as stream id,
-- job id, model triples (the retry itself is a script of its own, `retry`).
local lease, active, workers, readers, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local me, lease_ms = ARGV[1], ARGV[2]
local worker_ttl, reader_ttl, grace = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local queue_timeout, job_deadline = tonumber(ARGV[6]), tonumber(ARGV[7])
local stream_ttl, max_attempts = ARGV[8], tonumber(ARGV[9])
local meta_prefix, stream_prefix, in_progress_prefix, job_prefix =
  ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local cancel_channel, queue_prefix = ARGV[14], ARGV[20]
local unread_while_queued, queue_timed_out, worker_lost, job_timed_out, lost_every_time =
  ARGV[15], ARGV[16], ARGV[17], ARGV[18], ARGV[19]

local holder = redis.call('GET', lease)
if holder and holder ~= me then return {} end
redis.call('SET', lease, me, 'PX', lease_ms)
local now = redis_now_ms()
local retry = {}

-- One stream as the tick sees it.
local function read(id)
  local meta = meta_prefix .. id
  local m = redis.call('HMGET', meta, 'job', 'worker', 'ended', 'queued', 'started', 'unread',
                       'model', 'pinned')
  return {
    id = id, meta = meta, stream = stream_prefix .. id,
    job = m[1], worker = m[2], ended = m[3], queued = tonumber(m[4]), started = tonumber(m[5]),
    unread = tonumber(m[6]), model = m[7] or '', pinned = m[8],
  }
end

local function forget(s)
  redis.call('ZREM', active, s.id)
end

local function finish(s, payload)
  fenced_append(s.stream, s.meta, s.job, 'e', payload, stream_ttl)
  forget(s)
end

-- Whether nobody has read it for the resume grace. Whether it is read is noted in its metadata
-- (`unread`: since when not), where the workers' claims look too. A background response
-- (`pinned`) is always read.
local function abandoned(s)
  local seen = redis.call('ZSCORE', readers, s.id)
  if s.pinned or (seen and now - tonumber(seen) <= reader_ttl) then
    if s.unread then redis.call('HDEL', s.meta, 'unread') end
    return false
  end
  if not s.unread then
    s.unread = now
    redis.call('HSET', s.meta, 'unread', now)
  end
  return now - s.unread >= grace
end

-- Its attempt is lost: tried again while no token was written and attempts are left, else ended.
local function lost(s)
  if not tokenless(s.stream) then finish(s, worker_lost)
  elseif attempt_number(s.job) >= max_attempts then finish(s, lost_every_time)
  else
    table.insert(retry, s.id)
    table.insert(retry, s.job)
    table.insert(retry, s.model)
  end
end

-- What becomes of a stream, by its state (README, "The life of a stream").
local decide = {}

function decide.ended(s)
  forget(s)
end

function decide.queued(s)
  local unread = abandoned(s)
  local claimed = redis.call('GET', in_progress_prefix .. s.job)
  if claimed then
    -- A worker took it from the queue; its claim of the stream names it in a moment, unless the
    -- worker died or failed in between.
    if now - tonumber(claimed) > worker_ttl then lost(s) end
  elseif not redis.call('ZSCORE', queue_prefix .. s.model, s.job) then
    lost(s)  -- arq let go of an attempt no worker claimed (a failed claim, say)
  elseif unread or now - s.queued >= queue_timeout then
    redis.call('ZREM', queue_prefix .. s.model, s.job)
    redis.call('DEL', job_prefix .. s.job)
    finish(s, unread and unread_while_queued or queue_timed_out)
  end
end

function decide.running(s)
  local unread = abandoned(s)
  local beat = redis.call('ZSCORE', workers, s.worker)
  local listed = tonumber(redis.call('ZSCORE', held, s.job)) or s.started
  if not beat or now - tonumber(beat) > worker_ttl then
    lost(s)  -- its worker died (or gave it back: its worker field names no live worker)
  elseif now - math.max(listed, s.started) > worker_ttl then
    lost(s)  -- its worker lives, but no longer runs it
  elseif now - s.started > job_deadline then
    finish(s, job_timed_out)
  elseif unread then
    redis.call('PUBLISH', cancel_channel, s.id .. ' unread')  -- again each tick until it stops
  end
end

for _, id in ipairs(redis.call('ZRANGE', active, 0, -1)) do
  local s = read(id)
  local state = 'running'
  if not s.job or s.ended then state = 'ended'
  elseif not s.worker then state = 'queued' end
  decide[state](s)
end
return retry
