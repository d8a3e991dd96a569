-- A key's sliding window over the last minute (Cloudflare's estimate): this minute's count plus
-- the last minute's, weighted by how much of it the window still covers. The key is a hash of
-- minute (Redis's clock) -> count.
local function window_used(key, now)
  local minute = math.floor(now / 60000)
  local current = tonumber(redis.call('HGET', key, minute) or '0')
  local previous = tonumber(redis.call('HGET', key, minute - 1) or '0')
  return previous * (1 - (now % 60000) / 60000) + current, previous, current
end

local function window_add(key, now, amount)
  local minute = math.floor(now / 60000)
  redis.call('HINCRBY', key, minute, amount)
  redis.call('HDEL', key, minute - 2)
  redis.call('EXPIRE', key, 180)
end
