--! include redis_now

-- An API process says which streams it has clients reading: those it reads are marked read now
-- (Redis's clock), those it stopped reading are forgotten, and so are members no process has
-- refreshed for `keep`. The key's TTL covers readers only: nothing else lives in it.
-- KEYS: 1 readers. ARGV: 1 keep (ms), 2 how many streams it reads, then those streams, then
-- the streams it stopped reading.
local readers, keep, reading = KEYS[1], ARGV[1], tonumber(ARGV[2])

local now = redis_now_ms()
for i = 3, 2 + reading do redis.call('ZADD', readers, now, ARGV[i]) end
for i = 3 + reading, #ARGV do redis.call('ZREM', readers, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', readers, '-inf', now - tonumber(keep))
redis.call('PEXPIRE', readers, keep)
