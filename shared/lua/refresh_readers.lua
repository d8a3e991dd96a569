--! include redis_now

-- An API process says which streams it has clients reading: those it reads are marked read now
-- (Redis's clock), and a stream the supervisor had found unread (and so removed from here), read
-- again, is no longer; those it stopped reading are marked read a reader TTL ago, so that the
-- supervisor finds them at its next tick; members no process has refreshed for `keep` (longer)
-- go. The key's TTL covers readers only: nothing else lives in it.
-- KEYS: 1 readers. ARGV: 1 keep (ms), 2 reader TTL (ms), 3 how many streams it reads, then
-- those streams, then the streams it stopped reading.
local readers, keep, reader_ttl, reading = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local now = redis_now_ms()
for i = 4, 3 + reading do
  if redis.call('ZADD', readers, now, ARGV[i]) == 1 then
    redis.call('HDEL', '${META_PREFIX}' .. ARGV[i], 'unread')
  end
end
for i = 4 + reading, #ARGV do redis.call('ZADD', readers, 'XX', now - reader_ttl - 1, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', readers, '-inf', now - tonumber(keep))
redis.call('PEXPIRE', readers, keep)
