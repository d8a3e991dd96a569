-- Revokes a named API key: its record, every hash pointing at it, and its last use.
-- KEYS: 1 key records, 2 key hashes, 3 last use. ARGV: 1 name.
-- Returns 1, or 0 if there is no such key.
local records, hashes, last_use, name = KEYS[1], KEYS[2], KEYS[3], ARGV[1]

if redis.call('HDEL', records, name) == 0 then return 0 end
local all = redis.call('HGETALL', hashes)
for i = 1, #all, 2 do
  if all[i + 1] == name then redis.call('HDEL', hashes, all[i]) end
end
redis.call('HDEL', last_use, name)
return 1
