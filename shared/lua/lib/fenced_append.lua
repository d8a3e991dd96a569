--! include redis_now
--! include window

-- The one way anything is appended to a job's stream, by a worker or by the supervisor: fenced
-- by the appender's attempt (`job`). Returns the entry's id, or why it was refused: 'fenced'
-- (not the current attempt, or the stream has ended) or 'cancelled' (a token or a delta of a
-- cancelled stream: the worker learns of a cancel at its next token, whatever became of the
-- broadcast).
-- A stream keeps at most its metadata's `cap` entries. A terminal entry (`f`, `e`) ends the
-- stream: gives it and its metadata their TTL (the metadata's `keep` where set), closes it
-- (open streams, its owner's concurrent streams, its worker's attempts, the supervisor's due
-- and orphan marks) and
-- charges a finished one's tokens to its owner and to the deployment's tokens per minute.
-- `ttl` '0': the stream's TTL is left as it is.
--
-- Ids number the entries (issue 24): the n-th entry of a stream is `<ms>-<n>`, `n` counted in
-- the metadata (`n`), `ms` Redis's clock but never less than the last entry's (`ms`), so ids
-- still grow on a new master whose clock is behind. A reader checks that each entry it gets is
-- numbered one more than the last it had: an entry that a failover lost cannot go unnoticed.
-- `seq` (a worker's appends; nil for the supervisor's) is the number the appender expects its
-- entry to get. If its metadata's `wn` (the number of the last entry a worker wrote with one)
-- is at least `seq`, the entry was stored by an earlier try whose answer was lost (a connection
-- cut by a failover), and it is 'stored' again only in name. If the stream holds fewer entries
-- than the appender has written (`n` < `seq` - 1), a failover lost some: 'lost', and nothing is
-- appended after the hole. A negative `seq` is a writer's entry after such a hole (its error):
-- not checked, but numbered after -`seq`, the last number that writer gave an entry, so that it
-- cannot be taken for one of the entries lost (their numbers, on a new master whose clock is
-- behind, could come with the same milliseconds). `claim` (with `seq`) names the run of the
-- attempt that appends (shared/lua/claim_stream.lua): another run's is 'fenced'; one whose
-- claim a failover lost renews it.
--
-- Each stream appended to is rung once per call: `ring_bells`, which every script that appends
-- calls last, adds one entry to `${BELLS_KEY}` naming them, from which a hub learns which of
-- the streams it waits for have new entries (api/hub.py). Bells older than `${BELLS_KEEP_MS}` ms
-- are trimmed as new ones come, and the key expires that long after the last.
local rung, rung_keys = {}, {}
local function ring_bells()
  if #rung_keys == 0 then return end
  redis.call('XADD', '${BELLS_KEY}', 'MINID', '~', redis_now_ms() - ${BELLS_KEEP_MS}, '*', 'k',
             table.concat(rung_keys, ' '))
  redis.call('PEXPIRE', '${BELLS_KEY}', ${BELLS_KEEP_MS})  -- a quiet deployment keeps none
  rung, rung_keys = {}, {}
end

local function fenced_append(stream, meta, job, kind, payload, ttl, seq, claim)
  local after = 0
  if seq and seq < 0 then after, seq = -seq, nil end
  local current = redis.call('HMGET', meta, 'job', 'ended', 'owner', 'cap', 'keep', 'cancel', 'n',
                             'ms', 'wn', 'claim', 'worker')
  if current[1] ~= job or (claim and current[10] and current[10] ~= claim) then
    return 'fenced'
  end
  if seq and tonumber(current[9] or '0') >= seq then return 'stored' end
  if current[2] then return 'fenced' end
  local owner, cap, keep, cancelled, worker = current[3], current[4], current[5], current[6],
    current[11]
  if (kind == 't' or kind == 'd') and cancelled then return 'cancelled' end
  local n = math.max(tonumber(current[7] or '0'), after) + 1
  if seq and n ~= seq then return 'lost' end
  local ms = math.max(redis_now_ms(), tonumber(current[8] or '0'))
  local id = ms .. '-' .. n
  if cap and n > tonumber(cap) then  -- a stream of at most `cap` entries has nothing to trim
    redis.call('XADD', stream, 'MAXLEN', '~', cap, id, kind, payload)
  else
    redis.call('XADD', stream, id, kind, payload)
  end
  if not rung[stream] then
    rung[stream] = true
    rung_keys[#rung_keys + 1] = stream
  end
  if seq then
    redis.call('HSET', meta, 'n', n, 'ms', ms, 'wn', seq)
  else
    redis.call('HSET', meta, 'n', n, 'ms', ms)
  end
  if claim and not current[10] then redis.call('HSET', meta, 'claim', claim) end
  if kind == 'f' or kind == 'e' then
    ttl = keep or ttl
    redis.call('HSET', meta, 'ended', id)
    redis.call('EXPIRE', meta, ttl)
    local stream_id = string.sub(stream, #'${STREAM_PREFIX}' + 1)
    redis.call('ZREM', '${ACTIVE_KEY}', stream_id)
    redis.call('ZREM', '${DUE_KEY}', stream_id)
    redis.call('ZREM', '${ORPHANS_KEY}', job)
    if worker then redis.call('SREM', '${JOBS_PREFIX}' .. worker, job) end
    local tokens = kind == 'f' and cjson.decode(payload)['c']
    if owner then
      redis.call('ZREM', '${KEY_STREAMS_PREFIX}' .. owner, stream_id)
      if tokens then window_add('${KEY_TOKENS_PREFIX}' .. owner, redis_now_ms(), tokens) end
    end
    if tokens then window_add('${TOKENS_KEY}', redis_now_ms(), tokens) end
  end
  if ttl ~= '0' then redis.call('EXPIRE', stream, ttl) end
  return id
end
