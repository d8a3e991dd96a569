--! include redis_now
--! include fence

-- A worker claims the stream of the job it took from the queue: records that it runs the
-- stream's current attempt (in the metadata, and among its attempts: no longer an orphan to
-- be), and since when (Redis's clock), for the supervisor, to whom the stream is due at its job
-- deadline. Run again after a failure, it changes nothing but the time.
-- KEYS: 1 stream metadata, 2 the worker's attempts.
-- ARGV: 1 job id, 2 worker id, 3 stream id, 4 job deadline (ms).
-- Returns {'claimed', now}, {'cancelled', now} (cancelled before the job started: it ends so at
-- once), or {'gone'}: the stream ended or expired, or this attempt was replaced; the job does
-- nothing.
local meta, jobs = KEYS[1], KEYS[2]
local job, worker, stream_id, deadline = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local current = if_current(meta, job, 'cancel')
if not current then return {'gone'} end
local now = redis_now_ms()
redis.call('HSET', meta, 'worker', worker, 'started', now)
redis.call('SADD', jobs, job)
redis.call('ZREM', '${ORPHANS_KEY}', job)
redis.call('ZADD', '${DUE_KEY}', now + deadline, stream_id)
if current[3] then return {'cancelled', now} end
return {'claimed', now}
