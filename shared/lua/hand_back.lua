--! include redis_now
--! include fence
--! include attempts

-- Gives back a job whose backend cannot reach its engine, if another worker serves its model now
-- and the job may be tried again (this worker still runs it, no token written, attempts left):
-- the stream's worker is marked as one that is gone and the attempt as an orphan, and the
-- supervisor retries the job as it retries a lost worker's, fenced.
-- KEYS: 1 stream metadata, 2 stream, 3 the model's serving set, 4 the worker's attempts.
-- ARGV: 1 job id, 2 worker id, 3 worker TTL (ms), 4 max attempts.
-- Returns 1 if given back, 0 if not.
local meta, stream, serving, jobs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job, me, worker_ttl, max_attempts = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local current = if_current(meta, job, 'worker')
if not current or current[3] ~= me then return 0 end
if attempt_number(job) >= max_attempts or not tokenless(stream) then return 0 end
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', serving, redis_now_ms() - worker_ttl, '+inf')) do
  if worker ~= me then
    redis.call('HSET', meta, 'worker', me .. ' (gave the job back)')
    redis.call('SREM', jobs, job)
    redis.call('ZADD', '${ORPHANS_KEY}', 0, job)
    return 1
  end
end
return 0
