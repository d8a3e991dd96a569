--! include fenced_append

-- Ends a stream whose current attempt still waits in the queue: takes the job out of arq's hands
-- unless a worker has claimed it (arq marks a claim with the in-progress key), then appends the
-- terminal entry, fenced like any append, so every reader, now or resuming later, ends alike.
-- KEYS: 1 the attempt's in-progress key, 2 the model's queue, 3 the model's waiting jobs, 4 the
--       attempt's arq job key, 5 stream, 6 stream metadata.
-- ARGV: 1 job id, 2 the error entry's payload, 3 stream TTL (s).
-- Returns 1 if the stream was ended here, 0 if not (a worker has it, or it had ended).
local in_progress, queue, waiting, job_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream, meta = KEYS[5], KEYS[6]
local job, payload, ttl = ARGV[1], ARGV[2], ARGV[3]

if redis.call('EXISTS', in_progress) == 1 then return 0 end
redis.call('ZREM', queue, job)
redis.call('ZREM', waiting, job)
redis.call('DEL', job_key)
if fenced_append(stream, meta, job, 'e', payload, ttl) == 'fenced' then return 0 end
ring_bells()
return 1
