--! include redis_now
--! include fenced_append
--! include attempts
--! include bury

-- The supervisor's tick: decides, by Redis's clock, what becomes of the streams that need it, and
-- only those, so that its cost does not grow with the streams that are fine. Workers not heard
-- from for a TTL are buried (their attempts become orphans), then three indexes say which
-- (README, "The life of a stream"):
--   orphans  attempts whose time without a worker has come: lost (a worker died, froze, let go
--            of one, gave one back, or never claimed the stream of a job it took);
--   readers  streams no client has read for a reader TTL: unread from now, due at the end of
--            their resume grace (a background response, `pinned`, is always read);
--   due      streams whose time has come: a queue timeout, a job deadline, a grace's end.
-- Each index is read at most `most` at a time: a tick never holds Redis for long, and what is
-- left waits for the next. Only the holder of the lease decides; another API process takes
-- over within a lease TTL.
-- KEYS: 1 lease, 2 readers.
-- ARGV: 1 this process's id, 2 lease TTL (ms), 3 worker TTL (ms), 4 reader TTL (ms), 5 resume
--       grace (ms), 6 queue timeout (ms), 7 job deadline (ms), 8 how often the worker of an
--       unread running stream is told again (ms), 9 stream TTL (s), 10 max attempts, 11 most
--       streams per index and tick, 12-14 key prefixes: arq job, queue, waiting set;
--       15 cancel channel, 16-20 error payloads: unread while queued, queue timeout, worker
--       lost, job timeout, worker lost on every attempt.
-- Returns {} if another process holds the lease; else the lost attempts to retry, as stream id,
-- job id, model triples (the retry itself is a script of its own, `retry`).
local lease, readers = KEYS[1], KEYS[2]
local me, lease_ms = ARGV[1], ARGV[2]
local worker_ttl, reader_ttl, grace = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local queue_timeout, job_deadline, tell_again = tonumber(ARGV[6]), tonumber(ARGV[7]),
  tonumber(ARGV[8])
local stream_ttl, max_attempts, most = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
local job_prefix, queue_prefix, waiting_prefix = ARGV[12], ARGV[13], ARGV[14]
local cancel_channel = ARGV[15]
local unread_while_queued, queue_timed_out, worker_lost, job_timed_out, lost_every_time =
  ARGV[16], ARGV[17], ARGV[18], ARGV[19], ARGV[20]

local holder = redis.call('GET', lease)
if holder and holder ~= me then return {} end
redis.call('SET', lease, me, 'PX', lease_ms)
local now = redis_now_ms()
local retry = {}

-- One stream as the tick sees it, in its state: queued, running or ended (or expired).
local function read(id)
  local meta = '${META_PREFIX}' .. id
  local m = redis.call('HMGET', meta, 'job', 'worker', 'ended', 'queued', 'started', 'unread',
                       'model', 'pinned')
  local s = {
    id = id, meta = meta, stream = '${STREAM_PREFIX}' .. id, job = m[1], queued = tonumber(m[4]),
    started = tonumber(m[5]), unread = tonumber(m[6]), model = m[7] or '', pinned = m[8],
  }
  if not s.job or m[3] then s.state = 'ended'
  elseif not m[2] then s.state = 'queued'
  else s.state = 'running' end
  return s
end

local function forget(s)
  redis.call('ZREM', '${ACTIVE_KEY}', s.id)
  redis.call('ZREM', '${DUE_KEY}', s.id)
end

local function finish(s, payload)
  fenced_append(s.stream, s.meta, s.job, 'e', payload, stream_ttl)  -- and it is forgotten
  s.state = 'ended'
end

local function withdraw(s, payload)
  redis.call('ZREM', queue_prefix .. s.model, s.job)
  redis.call('ZREM', waiting_prefix .. s.model, s.job)
  redis.call('DEL', job_prefix .. s.job)
  finish(s, payload)
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

-- When it must be looked at again: its timeout, or its grace's end while unread.
local function schedule(s)
  if s.state == 'ended' then return forget(s) end
  local at = s.state == 'queued' and s.queued + queue_timeout or s.started + job_deadline
  if s.unread then at = math.min(at, s.unread + grace) end
  redis.call('ZADD', '${DUE_KEY}', at, s.id)
end

-- What becomes of a stream whose time has come, by its state.
local decide = {}

function decide.ended(s)
  forget(s)
end

function decide.queued(s)
  if s.unread and now - s.unread >= grace then withdraw(s, unread_while_queued)
  elseif now - s.queued >= queue_timeout then withdraw(s, queue_timed_out)
  else schedule(s) end
end

function decide.running(s)
  if now - s.started >= job_deadline then finish(s, job_timed_out)
  elseif s.unread and now - s.unread >= grace then
    redis.call('PUBLISH', cancel_channel, s.id .. ' unread')  -- again until its worker stops
    redis.call('ZADD', '${DUE_KEY}', now + tell_again, s.id)
  else schedule(s) end
end

local function stale(index, older_than)
  return redis.call('ZRANGEBYSCORE', index, '-inf', older_than, 'LIMIT', 0, most)
end

bury_the_dead(now, worker_ttl)
for _, job in ipairs(stale('${ORPHANS_KEY}', now)) do
  redis.call('ZREM', '${ORPHANS_KEY}', job)
  local s = read(string.match(job, '^(.*)%.%d+$'))
  if s.state ~= 'ended' and s.job == job then lost(s) end
end

for _, id in ipairs(stale(readers, now - reader_ttl)) do
  redis.call('ZREM', readers, id)
  local s = read(id)
  if s.state ~= 'ended' and not s.pinned and not s.unread then
    redis.call('HSET', s.meta, 'unread', now)
    redis.call('ZADD', '${DUE_KEY}', 'LT', now + grace, id)
  end
end

for _, id in ipairs(stale('${DUE_KEY}', now)) do
  local s = read(id)
  decide[s.state](s)
end
ring_bells()
return retry
