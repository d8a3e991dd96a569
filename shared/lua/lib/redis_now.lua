-- Redis's clock, in milliseconds: the one clock sluice compares times by (hosts' clocks may be
-- seconds apart).
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
