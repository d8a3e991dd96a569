-- Marks a stream cancelled, for its worker's next token append and a claim yet to come, and
-- tells its worker at once.
-- KEYS: 1 stream metadata. ARGV: 1 cancel channel, 2 the message (`<stream id> cancelled`).
local meta, channel, message = KEYS[1], ARGV[1], ARGV[2]

if redis.call('EXISTS', meta) == 1 then redis.call('HSET', meta, 'cancel', 1) end
redis.call('PUBLISH', channel, message)
