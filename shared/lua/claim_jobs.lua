--! include redis_now

-- A worker takes up to `free` due jobs from its model's queue, in one step, by Redis's clock.
-- (arq's own poll reads `max(5 * max_jobs, 100)` due ids from the head of the queue and claims
-- each with WATCH/EXISTS/ZSCORE/MULTI: running jobs stay in the queue, so a worker with a free
-- slot behind 100 running jobs, all workers' together, never saw a waiting one, and a burst cost
-- round trips per running job.) It scans past claimed jobs; a claim is arq's in-progress key,
-- here holding when it was claimed. A job whose stream no client reads (its metadata says
-- `unread`) is passed over: it keeps its place, and starts once its reader is back (or is
-- withdrawn).
-- KEYS: 1 the queue.
-- ARGV: 1 in-progress key prefix, 2 free slots, 3 in-progress TTL (ms), 4 most ids to scan,
--       5 stream metadata prefix.
-- Returns the claimed job ids, each followed by its score.
local queue = KEYS[1]
local in_progress_prefix, free, claim_ttl, most = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local meta_prefix = ARGV[5]

local function unread(job)
  local stream_id = string.match(job, '^(.*)%.%d+$')
  return stream_id and redis.call('HEXISTS', meta_prefix .. stream_id, 'unread') == 1
end

local now = redis_now_ms()
local claimed = {}
local offset = 0
while free > 0 and offset < most do
  local page = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', offset, 200)
  if #page == 0 then break end
  for i = 1, #page, 2 do
    local job = page[i]
    local in_progress = in_progress_prefix .. job
    if free > 0 and redis.call('EXISTS', in_progress) == 0 and not unread(job) then
      redis.call('PSETEX', in_progress, claim_ttl, now)
      table.insert(claimed, job)
      table.insert(claimed, page[i + 1])
      free = free - 1
    end
  end
  offset = offset + 200
end
return claimed
