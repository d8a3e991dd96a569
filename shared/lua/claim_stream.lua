--! include redis_now
--! include fence

-- A worker claims the stream of the job it took from the queue: records that it runs the
-- stream's current attempt, and since when (Redis's clock), for the supervisor. Run again after
-- a failure, it changes nothing but the time. `claim` names this run of the attempt: one attempt
-- runs once, even when its claim was lost (a failover to a replica that lacked it) and arq
-- hands the job out again: a second run finds the first's claim (its appends renew it) and
-- does nothing, or takes the attempt over and the first's next append is refused.
-- KEYS: 1 stream metadata. ARGV: 1 job id, 2 worker id, 3 claim (unique to this run).
-- Returns {'claimed', now, n}, {'cancelled', now, n} (cancelled before the job started: it ends
-- so at once), or {'gone'}: the stream ended or expired, or this attempt was replaced; the job
-- does nothing (another run of it has it). `n`: how many entries the stream has (fenced_append numbers them), which the
-- worker's own will follow.
local meta, job, worker, claim = KEYS[1], ARGV[1], ARGV[2], ARGV[3]

local current = if_current(meta, job, 'cancel', 'n', 'claim')
if not current or (current[5] and current[5] ~= claim) then return {'gone'} end
local now = redis_now_ms()
local n = tonumber(current[4] or '0')
redis.call('HSET', meta, 'worker', worker, 'started', now, 'claim', claim)
if current[3] then return {'cancelled', now, n} end
return {'claimed', now, n}
