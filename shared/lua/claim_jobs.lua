--! include redis_now
--! include claim

-- A worker takes up to `free` due jobs of its model, in one step, by Redis's clock, with what
-- each needs to start: arq's job record, and its stream claimed (lib/claim.lua), so that a job
-- starts without a round trip of its own. It looks only at the jobs no worker has taken (the
-- model's waiting set: arq keeps a running job in its queue until it ends, and a scan of the
-- queue would pass over every running job, each time). A taken job gets arq's in-progress key
-- (holding when it was taken) and leaves the waiting set. A job whose stream no client reads
-- (its metadata says `unread`) is passed over: it keeps its place, and starts once its reader is
-- back (or is withdrawn). A job taken whose claim Redis refused is an orphan from a worker TTL
-- on unless its worker claims it by then (shared/lua/claim_stream.lua; else the supervisor sees
-- to it).
-- KEYS: 1 the model's waiting jobs, 2 the worker's attempts.
-- ARGV: 1 in-progress key prefix, 2 free slots, 3 in-progress TTL (ms), 4 most ids to scan,
--       5 worker TTL (ms), 6 job record key prefix, 7 worker id, 8 job deadline (ms), 9 claim
--       prefix (unique to this call: the k-th job's claim is `<prefix>:<k>`).
-- Returns Redis's time (ms), then per job taken: its id, score, record (nil if none), the
-- claim's outcome and the number of entries its stream has (lib/claim.lua).
local waiting, jobs = KEYS[1], KEYS[2]
local in_progress_prefix, free, claim_ttl, most = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local worker_ttl, record_prefix, worker = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local deadline, claim_prefix = tonumber(ARGV[8]), ARGV[9]
local now = redis_now_ms()

local function unread(job)
  local stream_id = string.match(job, '^(.*)%.%d+$')
  return stream_id and redis.call('HEXISTS', '${META_PREFIX}' .. stream_id, 'unread') == 1
end

local function take(job, k)
  redis.call('PSETEX', in_progress_prefix .. job, claim_ttl, now)
  redis.call('ZREM', waiting, job)
  local stream_id = string.match(job, '^(.*)%.%d+$')
  local outcome, n = 'gone', 0
  if stream_id then
    outcome, n = claim_stream('${META_PREFIX}' .. stream_id, jobs, job, worker, stream_id,
                              deadline, claim_prefix .. ':' .. k, now, redis.pcall)
  end
  if outcome == 'refused' then redis.call('ZADD', '${ORPHANS_KEY}', now + worker_ttl, job) end
  return redis.call('GET', record_prefix .. job), outcome, n
end

local claimed = {now}
local offset = 0
local k = 0
while free > 0 and offset < most do
  local page = redis.call('ZRANGEBYSCORE', waiting, '-inf', now, 'WITHSCORES', 'LIMIT', offset, 200)
  if #page == 0 then break end
  local taken = 0
  for i = 1, #page, 2 do
    local job = page[i]
    if free > 0 and not unread(job) then
      k = k + 1
      local record, outcome, n = take(job, k)
      for _, value in ipairs({job, page[i + 1], record, outcome, n}) do
        table.insert(claimed, value)
      end
      free = free - 1
      taken = taken + 1
    end
  end
  offset = offset + 200 - taken  -- what was taken left the set
end
return claimed
