--! include redis_now
--! include window
--! include enqueue

-- Admits a request and queues its stream's first attempt, in one step: two API processes cannot
-- both admit past a limit. Capacity is the model's own: the live workers of its serving set (not
-- those of other models, nor those whose backend cannot serve), their slots, and its queue.
-- KEYS: 1 the model's serving set, 2 worker slots, 3 the model's queue, 4 the attempt's arq job
--       key, 5 stream metadata, 6 readers, 7 the model's waiting jobs, 8-10 the owner's
--       requests, tokens and open streams, 11 models, 12 workers, 13 workers' models.
-- ARGV: 1 most jobs waiting, 2 worker TTL (ms), 3 job id, 4 arq record, 5 job TTL (ms), 6 wake
--       channel, 7 stream id, 8 metadata TTL (s), 9-11 the owner's requests and tokens per
--       minute and open streams (0: no limit), 12 the model, 13 queue timeout (ms), 14...
--       metadata fields and values.
-- Returns {'queued', requests, tokens, ms to the next minute, now} (the owner's use of its
-- windows, this request included; 0 for a window it has no limit on), or why not: {'unknown_model'} (no worker ever announced it),
-- {'no_workers'}, {'engine_down'} (its live workers all report their backend cannot serve),
-- {'queue_full', waiting}, {'rate_limited', which limit, retry after (ms)}.
local serving, slots_of, queue, job_key, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local readers, waiting, models, workers, models_of = KEYS[6], KEYS[7], KEYS[11], KEYS[12], KEYS[13]
local requests_used, tokens_used, open_streams = KEYS[8], KEYS[9], KEYS[10]
local max_waiting, worker_ttl, job, record = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local job_ttl_ms, wake, stream_id, meta_ttl_s = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local rpm, tpm, max_streams = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local model, queue_timeout = ARGV[12], tonumber(ARGV[13])

local now = redis_now_ms()
local to_next_minute = 60000 - now % 60000

-- How long until a window at `limit` admits one more.
local function wait_ms(used, previous, current, limit)
  if previous > 0 and current + 1 <= limit then
    return math.min(math.ceil((used + 1 - limit) * 60000 / previous), to_next_minute)
  end
  return to_next_minute
end

if redis.call('HEXISTS', models, model) == 0 then return {'unknown_model'} end
local since = now - worker_ttl
local live = redis.call('ZRANGEBYSCORE', serving, since, '+inf')
if #live == 0 then
  -- None can serve it; one alive for this model has an engine that does not answer.
  for _, worker in ipairs(redis.call('ZRANGEBYSCORE', workers, since, '+inf')) do
    if redis.call('HGET', models_of, worker) == model then return {'engine_down'} end
  end
  return {'no_workers'}
end
if rpm > 0 then
  local used, previous, current = window_used(requests_used, now)
  if used + 1 > rpm then return {'rate_limited', 'requests', wait_ms(used, previous, current, rpm)} end
end
if tpm > 0 then
  local used, previous, current = window_used(tokens_used, now)
  if used >= tpm then return {'rate_limited', 'tokens', wait_ms(used, previous, current, tpm)} end
end
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', open_streams, '-inf', now - tonumber(meta_ttl_s) * 1000)
  if redis.call('ZCARD', open_streams) >= max_streams then return {'rate_limited', 'streams', 1000} end
end
local slots = 0
for _, worker in ipairs(live) do
  slots = slots + (tonumber(redis.call('HGET', slots_of, worker)) or 1)
end
local beyond = redis.call('ZCARD', queue) - slots  -- arq keeps running jobs in the queue
if beyond >= max_waiting then return {'queue_full', beyond} end

window_add(requests_used, now, 1)
redis.call('ZADD', open_streams, now, stream_id)
redis.call('EXPIRE', open_streams, meta_ttl_s)
redis.call('HSET', meta, unpack(ARGV, 14))
redis.call('ZADD', readers, now, stream_id)  -- whoever asked is reading
redis.call('EXPIRE', readers, meta_ttl_s)
enqueue{meta = meta, queue = queue, waiting = waiting, job_key = job_key, stream_id = stream_id,
        job = job, record = record, job_ttl_ms = job_ttl_ms, meta_ttl_s = meta_ttl_s, wake = wake,
        due_at = now + queue_timeout, now = now}
-- The use of a window goes back only for a limit it has (the x-ratelimit headers'); it is kept
-- all the same (above), for a limit set later.
local function use(key, limit)
  if limit == 0 then return 0 end
  return math.ceil(window_used(key, now))
end
return {'queued', use(requests_used, rpm), use(tokens_used, tpm), to_next_minute, now}
