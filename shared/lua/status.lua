--! include redis_now
--! include window

-- The deployment as Redis sees it, in one round trip (`/metrics` gauges, `sluice status`).
-- KEYS: 1 workers, 2 worker slots, 3 worker busy, 4 worker loops, 5 worker models, 6 active
--       streams, 7 tokens, 8 models.
-- ARGV: 1 worker TTL (ms), 2 waiting set prefix, 3 queue prefix, 4 serving set prefix.
-- Returns {open streams, tokens in the last minute, {per model ever announced: name, queued,
-- running}, {per live worker: id, ms since its heartbeat, slots, busy, failing loops, model,
-- can serve (1/0)}}.
local workers, slots_of, busy_of, loops_of, model_of = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local active, tokens, announced = KEYS[6], KEYS[7], KEYS[8]
local worker_ttl, waiting_prefix, queue_prefix, serving_prefix =
  tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]

local now = redis_now_ms()
local models = {}
for _, model in ipairs(redis.call('HKEYS', announced)) do
  local queued = redis.call('ZCARD', waiting_prefix .. model)
  local running = redis.call('ZCARD', queue_prefix .. model) - queued  -- arq keeps them there
  table.insert(models, model)
  table.insert(models, queued)
  table.insert(models, running)
end
local live = {}
local beats = redis.call('ZRANGEBYSCORE', workers, now - worker_ttl, '+inf', 'WITHSCORES')
for i = 1, #beats, 2 do
  local id = beats[i]
  local model = redis.call('HGET', model_of, id) or ''
  table.insert(live, id)
  table.insert(live, now - tonumber(beats[i + 1]))
  table.insert(live, tonumber(redis.call('HGET', slots_of, id)) or 1)
  table.insert(live, tonumber(redis.call('HGET', busy_of, id)) or 0)
  table.insert(live, redis.call('HGET', loops_of, id) or '')
  table.insert(live, model)
  table.insert(live, redis.call('ZSCORE', serving_prefix .. model, id) and 1 or 0)
end
return {redis.call('ZCARD', active), math.floor(window_used(tokens, now)), models, live}
