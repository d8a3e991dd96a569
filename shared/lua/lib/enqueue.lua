-- Puts an attempt in its model's queue, written as arq's enqueue_job writes a job (its record,
-- then the queue entry), and among the jobs no worker has taken yet; marks its stream open and
-- queued since `now`, due to the supervisor at its queue timeout; and wakes the model's
-- workers. (arq's own enqueue_job spends three round trips guarding against a duplicate id;
-- ours are fresh.)
-- q: meta, queue, waiting, job_key (keys); stream_id, job, record, job_ttl_ms, meta_ttl_s,
-- wake (channel), due_at, now.
local function enqueue(q)
  redis.call('HSET', q.meta, 'queued', q.now)
  redis.call('EXPIRE', q.meta, q.meta_ttl_s)
  redis.call('ZADD', '${ACTIVE_KEY}', 'NX', q.now, q.stream_id)
  redis.call('ZADD', '${DUE_KEY}', q.due_at, q.stream_id)
  redis.call('PSETEX', q.job_key, q.job_ttl_ms, q.record)
  redis.call('ZADD', q.queue, q.now, q.job)
  redis.call('ZADD', q.waiting, q.now, q.job)
  redis.call('PUBLISH', q.wake, q.job)
end
