--! include fenced_append

-- Appends a batch of entries, in order, each to its own job's stream (`fenced_append`): one
-- command for the batch, where a pipeline of XADDs costs the worker a command's encoding per
-- token.
-- KEYS: per entry, its stream and its stream's metadata.
-- ARGV: per entry, its attempt (job id), kind, payload and TTL (s; '0': none).
-- Returns per entry its id, or why it was refused ('fenced', 'cancelled').
local ids = {}
for i = 1, #KEYS / 2 do
  local stream, meta = KEYS[2 * i - 1], KEYS[2 * i]
  local at = 4 * (i - 1)
  local job, kind, payload, ttl = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  ids[i] = fenced_append(stream, meta, job, kind, payload, ttl)
end
return ids
