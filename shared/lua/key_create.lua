-- Stores a new named API key: its record, and its hash pointing at its name.
-- KEYS: 1 key records, 2 key hashes. ARGV: 1 name, 2 the key's SHA-256 (hex), 3 record (JSON).
-- Returns 1, or 0 if the name is taken.
local records, hashes, name, hash, record = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]

if redis.call('HEXISTS', records, name) == 1 then return 0 end
redis.call('HSET', records, name, record)
redis.call('HSET', hashes, hash, name)
return 1
