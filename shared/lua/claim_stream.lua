--! include redis_now
--! include fence

-- A worker claims the stream of the job it took from the queue: records that it runs the
-- stream's current attempt (in the metadata, and among its attempts: no longer an orphan to
-- be), and since when (Redis's clock), for the supervisor, to whom the stream is due at its job
-- deadline. Run again after a failure, it changes nothing but the time. `claim` names this run
-- of the attempt: one attempt runs once, even when its claim was lost (a failover to a replica
-- that lacked it) and arq hands the job out again: a second run finds the first's claim (its
-- appends renew it) and does nothing, or takes the attempt over and the first's next append is
-- refused.
-- KEYS: 1 stream metadata, 2 the worker's attempts.
-- ARGV: 1 job id, 2 worker id, 3 stream id, 4 job deadline (ms), 5 claim (unique to this run).
-- Returns {'claimed', now, n}, {'cancelled', now, n} (cancelled before the job started: it ends
-- so at once), or {'gone'}: the stream ended or expired, or this attempt was replaced, or
-- another run of it has it; the job does nothing. `n`: how many entries the stream has
-- (fenced_append numbers them), which the worker's own will follow.
local meta, jobs = KEYS[1], KEYS[2]
local job, worker, stream_id, deadline = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local claim = ARGV[5]

local current = if_current(meta, job, 'cancel', 'n', 'claim')
if not current or (current[5] and current[5] ~= claim) then return {'gone'} end
local now = redis_now_ms()
local n = tonumber(current[4] or '0')
redis.call('HSET', meta, 'worker', worker, 'started', now, 'claim', claim)
redis.call('SADD', jobs, job)
redis.call('ZREM', '${ORPHANS_KEY}', job)
redis.call('ZADD', '${DUE_KEY}', now + deadline, stream_id)
if current[3] then return {'cancelled', now, n} end
return {'claimed', now, n}
