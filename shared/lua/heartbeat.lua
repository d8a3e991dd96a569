--! include redis_now

-- A worker's heartbeat, by Redis's clock: its score in the workers' set, and one field in each
-- per-worker hash (its slots, its loops that are not running, its jobs running, its model).
-- Workers not heard from for a TTL are dropped: they died without saying goodbye. While its
-- backend can serve, it also beats in its model's serving set; its model is announced in the
-- models table, which never expires; and each attempt it runs is marked held, so that one it let
-- go of is noticed.
-- KEYS: 1 workers, 2-5 the per-worker hashes (slots, loops, busy, models), 6 its model's
--       serving set, 7 models, 8 held attempts.
-- ARGV: 1 worker id, 2 TTL (ms), 3-6 its value in each hash (6: its model), 7 whether its
--       backend can serve ('1' or '0'), 8 the model's context length ('': unknown), 9... the job
--       ids it runs.
-- Returns how many dead workers it dropped.
local workers, serving, models, held = KEYS[1], KEYS[6], KEYS[7], KEYS[8]
local me, ttl, model, can_serve, n_ctx = ARGV[1], tonumber(ARGV[2]), ARGV[6], ARGV[7], ARGV[8]
local HASHES = {2, 3, 4, 5}  -- KEYS index of each per-worker hash; its value is ARGV[index + 1]

local now = redis_now_ms()
local dead = redis.call('ZRANGEBYSCORE', workers, '-inf', now - ttl)
for _, worker in ipairs(dead) do
  redis.call('ZREM', workers, worker)
  for _, i in ipairs(HASHES) do redis.call('HDEL', KEYS[i], worker) end
end
redis.call('ZADD', workers, now, me)
for _, i in ipairs(HASHES) do redis.call('HSET', KEYS[i], me, ARGV[i + 1]) end
if can_serve == '1' then redis.call('ZADD', serving, now, me)
else redis.call('ZREM', serving, me) end
redis.call('ZREMRANGEBYSCORE', serving, '-inf', now - ttl)
for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ttl) end
local announced = {announced = now}
if n_ctx ~= '' then announced.n_ctx = tonumber(n_ctx) end
redis.call('HSET', models, model, cjson.encode(announced))
for i = 9, #ARGV do redis.call('ZADD', held, now, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', held, '-inf', now - ttl)
redis.call('PEXPIRE', held, ttl)
return #dead
