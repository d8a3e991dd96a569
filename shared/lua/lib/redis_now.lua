-- Redis's clock, in milliseconds: the one clock sluice compares times by (hosts' clocks may be
-- seconds apart). Read once per script call (a call is atomic: nothing else happens meanwhile),
-- not once per entry a batch appends.
local redis_now_read
local function redis_now_ms()
  if not redis_now_read then
    local t = redis.call('TIME')
    redis_now_read = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return redis_now_read
end
