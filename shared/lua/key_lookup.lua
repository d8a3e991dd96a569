-- The named API key a presented key's hash belongs to.
-- KEYS: 1 key hashes, 2 key records. ARGV: 1 the presented key's SHA-256 (hex).
-- Returns {name, record (JSON)}, or nil if it is no key's.
local hashes, records, hash = KEYS[1], KEYS[2], ARGV[1]

local name = redis.call('HGET', hashes, hash)
if not name then return nil end
local record = redis.call('HGET', records, name)
if not record then return nil end
return {name, record}
