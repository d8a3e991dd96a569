--! include redis_now

-- The workers whose heartbeat is fresh by Redis's clock.
-- KEYS: 1 workers. ARGV: 1 worker TTL (ms).
return redis.call('ZRANGEBYSCORE', KEYS[1], redis_now_ms() - tonumber(ARGV[1]), '+inf')
