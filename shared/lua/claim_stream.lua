--! include redis_now
--! include claim

-- A worker claims the stream of a job it took, where the claim that took it could not
-- (shared/lua/claim_jobs.lua answered 'refused'); tried again while Redis refuses.
-- KEYS: 1 stream metadata, 2 the worker's attempts.
-- ARGV: 1 job id, 2 worker id, 3 stream id, 4 job deadline (ms), 5 claim (unique to this run).
-- Returns {outcome, now, n} (lib/claim.lua); a refused write is raised.
local meta, jobs = KEYS[1], KEYS[2]
local job, worker, stream_id, deadline = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = redis_now_ms()
local outcome, n = claim_stream(meta, jobs, job, worker, stream_id, deadline, ARGV[5], now,
                                redis.call)
return {outcome, now, n}
