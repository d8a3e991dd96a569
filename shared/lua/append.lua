--! include fenced_append

-- Appends a batch of entries, in order, each to its own job's stream (`fenced_append`): one
-- command for the batch, where a pipeline of XADDs costs the worker a command's encoding per
-- token.
-- KEYS: per entry, its stream and its stream's metadata.
-- ARGV: per entry, its attempt (job id), kind, payload, TTL (s; '0': none), the number the
--       writer expects it to get in its stream (negative: not checked, but after that number;
--       see fenced_append) and the run of the attempt that writes it (both '': whatever comes
--       next, by any run).
-- Returns per entry its id, or why it was not appended: 'fenced', 'cancelled', 'lost' (a
-- failover lost entries the writer had stored), or 'stored' (an earlier try stored it). The
-- writer numbers a batch's entries before it knows which will be refused: an entry refused
-- ('fenced', 'cancelled') takes no number, and the stream's later entries of the batch each
-- expect one less.
local ids = {}
local refused = {}
for i = 1, #KEYS / 2 do
  local stream, meta = KEYS[2 * i - 1], KEYS[2 * i]
  local at = 6 * (i - 1)
  local job, kind, payload, ttl = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local seq, claim = tonumber(ARGV[at + 5]), ARGV[at + 6]
  if seq == 0 then seq = nil end
  if seq and seq > 0 then seq = seq - (refused[stream] or 0) end
  if claim == '' then claim = nil end
  ids[i] = fenced_append(stream, meta, job, kind, payload, ttl, seq, claim)
  if ids[i] == 'fenced' or ids[i] == 'cancelled' then refused[stream] = (refused[stream] or 0) + 1 end
end
ring_bells()
return ids
