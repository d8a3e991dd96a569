--! include fence

-- A worker claims the stream of a job it took from the queue: records that it runs the stream's
-- current attempt (in the metadata, and among its attempts: no longer an orphan to be), and
-- since when (Redis's clock `now`), for the supervisor, to whom the stream is due at its job
-- deadline. Claimed again by the same run, it changes nothing but the time. `claim` names this
-- run of the attempt: one attempt runs once, even when its claim was lost (a failover to a
-- replica that lacked it) and arq hands the job out again: a second run finds the first's claim
-- (its appends renew it) and does nothing, or takes the attempt over and the first's next append
-- is refused. `write` is redis.call, or redis.pcall where a refused write (an ACL, `maxmemory`)
-- must not end the calling script.
-- Returns 'claimed', 'cancelled' (cancelled before the job started: it ends so at once), 'gone'
-- (the stream ended or expired, or this attempt was replaced, or another run of it has it: the
-- job does nothing) or 'refused' (Redis refused the write), and how many entries the stream has
-- (fenced_append numbers them), which the worker's own will follow.
local function claim_stream(meta, jobs, job, worker, stream_id, deadline, claim, now, write)
  local current = if_current(meta, job, 'cancel', 'n', 'claim')
  if not current or (current[5] and current[5] ~= claim) then return 'gone', 0 end
  local n = tonumber(current[4] or '0')
  local written = write('HSET', meta, 'worker', worker, 'started', now, 'claim', claim)
  if type(written) == 'table' and written.err then return 'refused', n end
  redis.call('SADD', jobs, job)
  redis.call('ZREM', '${ORPHANS_KEY}', job)
  redis.call('ZADD', '${DUE_KEY}', now + deadline, stream_id)
  if current[3] then return 'cancelled', n end
  return 'claimed', n
end
