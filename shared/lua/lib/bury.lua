-- A worker not heard from for a TTL is gone (it died without saying goodbye): out of the workers'
-- set and its per-worker hashes, and each attempt it ran is an orphan from now, for the
-- supervisor.
local function bury(worker)
  redis.call('ZREM', '${WORKERS_KEY}', worker)
  for _, hash in ipairs({'${WORKER_SLOTS_KEY}', '${WORKER_LOOPS_KEY}', '${WORKER_BUSY_KEY}',
                         '${WORKER_MODELS_KEY}'}) do
    redis.call('HDEL', hash, worker)
  end
  local jobs = '${JOBS_PREFIX}' .. worker
  for _, job in ipairs(redis.call('SMEMBERS', jobs)) do
    redis.call('ZADD', '${ORPHANS_KEY}', 0, job)
  end
  redis.call('DEL', jobs)
end

-- Buries every worker not heard from for `ttl` (ms); how many.
local function bury_the_dead(now, ttl)
  local dead = redis.call('ZRANGEBYSCORE', '${WORKERS_KEY}', '-inf', now - ttl)
  for _, worker in ipairs(dead) do bury(worker) end
  return #dead
end
