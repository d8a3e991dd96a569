--! include redis_now
--! include window
--! include fence

-- The one way anything is appended to a job's stream, by a worker or by the supervisor: fenced
-- by the appender's attempt (`job`). Returns the entry's id, or why it was refused: 'fenced'
-- (not the current attempt, or the stream has ended) or 'cancelled' (a token of a cancelled
-- stream: the worker learns of a cancel at its next token, whatever became of the broadcast).
-- A stream keeps at most its metadata's `cap` entries. A terminal entry (`f`, `e`) ends the
-- stream, gives it and its metadata their TTL (the metadata's `keep` where set), closes it for
-- its owner's concurrent streams and charges a finished one's tokens to its owner and to the
-- deployment's tokens per minute. `ttl` '0': the stream's TTL is left as it is.
local function fenced_append(stream, meta, job, kind, payload, ttl)
  local current = if_current(meta, job, 'owner', 'cap', 'keep', 'cancel')
  if not current then return 'fenced' end
  local owner, cap, keep, cancelled = current[3], current[4], current[5], current[6]
  if kind == 't' and cancelled then return 'cancelled' end
  local id
  if cap then
    id = redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', kind, payload)
  else
    id = redis.call('XADD', stream, '*', kind, payload)
  end
  if kind == 'f' or kind == 'e' then
    ttl = keep or ttl
    redis.call('HSET', meta, 'ended', id)
    redis.call('EXPIRE', meta, ttl)
    local tokens = kind == 'f' and cjson.decode(payload)['c']
    if owner then
      redis.call('ZREM', '${KEY_STREAMS_PREFIX}' .. owner, string.sub(stream, #'${STREAM_PREFIX}' + 1))
      if tokens then window_add('${KEY_TOKENS_PREFIX}' .. owner, redis_now_ms(), tokens) end
    end
    if tokens then window_add('${TOKENS_KEY}', redis_now_ms(), tokens) end
  end
  if ttl ~= '0' then redis.call('EXPIRE', stream, ttl) end
  return id
end
