--! include redis_now

-- A worker takes up to `free` due jobs of its model, in one step, by Redis's clock. It looks only
-- at the jobs no worker has taken (the model's waiting set: arq keeps a running job in its queue
-- until it ends, and a scan of the queue would pass over every running job, each time). A taken
-- job gets arq's in-progress key (holding when it was taken), leaves the waiting set, and is an
-- orphan from a worker TTL on unless its stream is claimed by then (the supervisor would see to
-- it). A job whose
-- stream no client reads (its metadata says `unread`) is passed over: it keeps its place, and
-- starts once its reader is back (or is withdrawn).
-- KEYS: 1 the model's waiting jobs.
-- ARGV: 1 in-progress key prefix, 2 free slots, 3 in-progress TTL (ms), 4 most ids to scan,
--       5 worker TTL (ms).
-- Returns the claimed job ids, each followed by its score.
local waiting = KEYS[1]
local in_progress_prefix, free, claim_ttl, most = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local worker_ttl = tonumber(ARGV[5])

local function unread(job)
  local stream_id = string.match(job, '^(.*)%.%d+$')
  return stream_id and redis.call('HEXISTS', '${META_PREFIX}' .. stream_id, 'unread') == 1
end

local now = redis_now_ms()
local claimed = {}
local offset = 0
while free > 0 and offset < most do
  local page = redis.call('ZRANGEBYSCORE', waiting, '-inf', now, 'WITHSCORES', 'LIMIT', offset, 200)
  if #page == 0 then break end
  local taken = 0
  for i = 1, #page, 2 do
    local job = page[i]
    if free > 0 and not unread(job) then
      redis.call('PSETEX', in_progress_prefix .. job, claim_ttl, now)
      redis.call('ZREM', waiting, job)
      redis.call('ZADD', '${ORPHANS_KEY}', now + worker_ttl, job)
      table.insert(claimed, job)
      table.insert(claimed, page[i + 1])
      free = free - 1
      taken = taken + 1
    end
  end
  offset = offset + 200 - taken  -- what was taken left the set
end
return claimed
