--! include redis_now
--! include fence
--! include enqueue

-- Replaces a lost attempt with the next, in one step: `dead` must still be the stream's current
-- attempt and the stream must not have ended (a late retry cannot revive a stream); `dead` is
-- taken out of arq's hands for good and `new` queued, so no moment exists where the stream's
-- attempt is in no queue. From then on the fence refuses anything `dead` still appends.
-- KEYS: 1 stream metadata, 2 the model's queue, 3 the dead attempt's arq job key, 4 the new
--       one's, 5 active streams.
-- ARGV: 1 dead job id, 2 new job id, 3 the new job's arq record, 4 job TTL (ms), 5 metadata TTL
--       (s), 6 the model's wake channel, 7 stream id.
-- Returns 1 if retried, 0 if not.
local meta, queue, dead_key, new_key, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local dead, new, record, job_ttl_ms, meta_ttl_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local wake, stream_id = ARGV[6], ARGV[7]

if not if_current(meta, dead) then return 0 end
redis.call('HSET', meta, 'job', new)
redis.call('HDEL', meta, 'worker', 'started', 'claim')
redis.call('ZREM', queue, dead)
redis.call('DEL', dead_key)
enqueue(meta, queue, new_key, active, stream_id, new, record, job_ttl_ms, meta_ttl_s, wake,
        redis_now_ms())
return 1
