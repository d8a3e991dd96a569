--! include redis_now
--! include bury

-- A worker's heartbeat, by Redis's clock: its score in the workers' set, and one field in each
-- per-worker hash (its slots, its loops that are not running, its jobs running, its model).
-- Workers not heard from for a TTL are buried. While its backend can serve, it also beats in
-- its model's serving set; its model is announced in the models table, which never expires.
-- The attempts it let go of since its last beat (a job that could not write its stream's end)
-- become orphans, for the supervisor. Its cost does not grow with the jobs it runs.
-- KEYS: 1 workers, 2-5 the per-worker hashes (slots, loops, busy, models), 6 its model's
--       serving set, 7 models, 8 the attempts it runs.
-- ARGV: 1 worker id, 2 TTL (ms), 3-6 its value in each hash (6: its model), 7 whether its
--       backend can serve ('1' or '0'), 8 the model's context length ('': unknown), 9 how long
--       its set of attempts is kept unless it beats again (ms), 10 whether to bury the dead
--       ('0' for a TTL after Redis came back or failed over to a replica, whose last beats
--       are older than the workers that gave them: they have a TTL to beat again first),
--       11... the attempts it let go of.
-- Returns how many dead workers it buried.
local workers, serving, models, jobs = KEYS[1], KEYS[6], KEYS[7], KEYS[8]
local me, ttl, model, can_serve, n_ctx = ARGV[1], tonumber(ARGV[2]), ARGV[6], ARGV[7], ARGV[8]
local jobs_ttl = ARGV[9]
local HASHES = {2, 3, 4, 5}  -- KEYS index of each per-worker hash; its value is ARGV[index + 1]

local now = redis_now_ms()
local buried = 0
if ARGV[10] == '1' then buried = bury_the_dead(now, ttl) end
redis.call('ZADD', workers, now, me)
for _, i in ipairs(HASHES) do redis.call('HSET', KEYS[i], me, ARGV[i + 1]) end
if can_serve == '1' then redis.call('ZADD', serving, now, me)
else redis.call('ZREM', serving, me) end
redis.call('ZREMRANGEBYSCORE', serving, '-inf', now - ttl)
for i = 2, 6 do redis.call('PEXPIRE', KEYS[i], ttl) end
redis.call('PEXPIRE', workers, jobs_ttl)  -- kept past the last beat: the dead must be buried
local announced = {announced = now}
if n_ctx ~= '' then announced.n_ctx = tonumber(n_ctx) end
redis.call('HSET', models, model, cjson.encode(announced))
for i = 11, #ARGV do
  redis.call('SREM', jobs, ARGV[i])
  redis.call('ZADD', '${ORPHANS_KEY}', 0, ARGV[i])
end
redis.call('PEXPIRE', jobs, jobs_ttl)
return buried
