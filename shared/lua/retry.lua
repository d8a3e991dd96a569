--! include redis_now
--! include fence
--! include enqueue

-- Replaces a lost attempt with the next, in one step: `dead` must still be the stream's current
-- attempt and the stream must not have ended (a late retry cannot revive a stream); `dead` is
-- taken out of arq's hands for good and `new` queued, so no moment exists where the stream's
-- attempt is in no queue. From then on the fence refuses anything `dead` still appends.
-- KEYS: 1 stream metadata, 2 the model's queue, 3 the model's waiting jobs, 4 the dead
--       attempt's arq job key, 5 the new one's.
-- ARGV: 1 dead job id, 2 new job id, 3 the new job's arq record, 4 job TTL (ms), 5 metadata TTL
--       (s), 6 the model's wake channel, 7 stream id, 8 queue timeout (ms).
-- Returns 1 if retried, 0 if not.
local meta, queue, waiting, dead_key, new_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local dead, new, record, job_ttl_ms, meta_ttl_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local wake, stream_id, queue_timeout = ARGV[6], ARGV[7], tonumber(ARGV[8])

if not if_current(meta, dead) then return 0 end
redis.call('HSET', meta, 'job', new)
redis.call('HDEL', meta, 'worker', 'started', 'claim')
redis.call('ZREM', queue, dead)
redis.call('ZREM', waiting, dead)
redis.call('DEL', dead_key)
local now = redis_now_ms()
enqueue{meta = meta, queue = queue, waiting = waiting, job_key = new_key, stream_id = stream_id,
        job = new, record = record, job_ttl_ms = job_ttl_ms, meta_ttl_s = meta_ttl_s, wake = wake,
        due_at = now + queue_timeout, now = now}
return 1
