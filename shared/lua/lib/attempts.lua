-- An attempt's number: its job id is `<stream id>.<n>`.
local function attempt_number(job)
  return tonumber(string.match(job, '%.(%d+)$'))
end

-- Whether a stream holds no token yet: its newest entry is a `Started` (or there is none). An
-- attempt is retried only then.
local function tokenless(stream)
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  return not newest or newest[2][1] == 's'
end
