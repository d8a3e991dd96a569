-- Puts an attempt in its model's queue, written as arq's enqueue_job writes a job (its record,
-- then the queue entry), marks its stream active and queued since `now`, and wakes the model's
-- workers. (arq's own enqueue_job spends three round trips guarding against a duplicate id;
-- ours are fresh.)
local function enqueue(meta, queue, job_key, active, stream_id, job, record, job_ttl_ms,
                       meta_ttl_s, wake, now)
  redis.call('HSET', meta, 'queued', now)
  redis.call('EXPIRE', meta, meta_ttl_s)
  redis.call('ZADD', active, 'NX', now, stream_id)
  redis.call('EXPIRE', active, meta_ttl_s)
  redis.call('PSETEX', job_key, job_ttl_ms, record)
  redis.call('ZADD', queue, now, job)
  redis.call('PUBLISH', wake, job)
end
