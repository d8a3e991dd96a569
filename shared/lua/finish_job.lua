-- Closes a job whose function has ended, as arq's `Worker.finish_job` does for a finished job
-- that keeps no result (tests/test_arq_contract.py holds the two alike).
-- KEYS: 1 the job's in-progress key, 2 its retry key, 3 its arq job key, 4 arq's aborted jobs,
--       5 the queue.
-- ARGV: 1 job id.
-- Returns 0.
local in_progress, retry, job_key, aborted, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job = ARGV[1]

redis.call('ZREM', aborted, job)
redis.call('ZREM', queue, job)
redis.call('DEL', retry, job_key, in_progress)
return 0
