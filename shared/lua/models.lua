--! include redis_now

-- Every model ever announced, with its record and how many live workers can serve it now.
-- KEYS: 1 models. ARGV: 1 worker TTL (ms), 2 serving set prefix.
-- Returns {model, record (JSON), workers, ...}.
local models, worker_ttl, serving_prefix = KEYS[1], tonumber(ARGV[1]), ARGV[2]

local since = redis_now_ms() - worker_ttl
local out = {}
local announced = redis.call('HGETALL', models)
for i = 1, #announced, 2 do
  local model, record = announced[i], announced[i + 1]
  table.insert(out, model)
  table.insert(out, record)
  table.insert(out, redis.call('ZCOUNT', serving_prefix .. model, since, '+inf'))
end
return out
