--! include redis_now
--! include fence

-- A worker claims the stream of the job it took from the queue: records that it runs the
-- stream's current attempt, and since when (Redis's clock), for the supervisor. Run again after
-- a failure, it changes nothing but the time.
-- KEYS: 1 stream metadata. ARGV: 1 job id, 2 worker id.
-- Returns {'claimed', now}, {'cancelled', now} (cancelled before the job started: it ends so at
-- once), or {'gone'}: the stream ended or expired, or this attempt was replaced; the job does
-- nothing.
local meta, job, worker = KEYS[1], ARGV[1], ARGV[2]

local current = if_current(meta, job, 'cancel')
if not current then return {'gone'} end
local now = redis_now_ms()
redis.call('HSET', meta, 'worker', worker, 'started', now)
if current[3] then return {'cancelled', now} end
return {'claimed', now}
