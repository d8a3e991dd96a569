"""A worker's claim of a stream (shared/lua/lib/claim.lua: by the claim that takes its job,
shared/lua/claim_jobs.lua, or on its own, shared/lua/claim_stream.lua) and the API's withdrawal of
a queued job (shared/lua/withdraw.lua), against a real Redis, in every state a stream can be in."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from shared.arq_internals import in_progress_key, job_key
from shared.protocol import (
    DUE_KEY,
    ORPHANS_KEY,
    Attempt,
    Failed,
    encode,
    from_fields,
    job_id,
    jobs_key,
)
from shared.scripts import lua
from tests.procs import RedisServer

ME = "worker-me"
DEADLINE_MS = 600_000
GONE = Failed({"message": "withdrawn", "type": "cancelled", "param": None, "code": "cancelled"})


@pytest.fixture(scope="module")
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url()) as client:
        yield client


def a_stream(r: redis.Redis, replaced: bool, ended: bool, cancelled: bool) -> Attempt:
    """A stream whose first attempt is `attempt`; its current one is the second if `replaced`."""
    stream_id = f"claim-{uuid.uuid4().hex}"
    attempt = Attempt(stream_id, job_id(stream_id, 1))
    meta = {"job": job_id(stream_id, 2 if replaced else 1)}
    if ended:
        meta["ended"] = "1-0"
    if cancelled:
        meta["cancel"] = "1"
    r.hset(attempt.meta_key, mapping=meta)
    return attempt


def claim_on_its_own(r: redis.Redis, attempt: Attempt) -> tuple[bytes, int, int]:
    """shared/lua/claim_stream.lua, for a job already taken (an orphan unless it claims)."""
    r.zadd(ORPHANS_KEY, {attempt.job: 1})
    outcome, now, entries = r.register_script(lua("claim_stream"))(
        keys=[attempt.meta_key, jobs_key(ME)],
        args=[attempt.job, ME, attempt.stream_id, DEADLINE_MS, "run:1"],
    )
    return outcome, now, entries


def claim_as_taken(r: redis.Redis, attempt: Attempt) -> tuple[bytes, int, int]:
    """shared/lua/claim_jobs.lua, taking the job from its model's waiting set with its record."""
    waiting = f"waiting-{attempt.stream_id}"
    r.zadd(waiting, {attempt.job: 1})
    r.set(job_key(attempt.job), b"the record")
    now, *taken = r.register_script(lua("claim_jobs"))(
        keys=[waiting, jobs_key(ME)],
        args=["in-progress:", 10, 60_000, 100, 3000, "arq:job:", ME, DEADLINE_MS, "run"],
    )
    r.delete(waiting, job_key(attempt.job), f"in-progress:{attempt.job}")
    [job, _, record, outcome, entries] = taken
    assert (job, record) == (attempt.job.encode(), b"the record")
    return outcome, now, entries


@pytest.mark.parametrize("claim", [claim_on_its_own, claim_as_taken])
def test_a_claim_takes_a_stream_exactly_when_its_attempt_is_current(
    r: redis.Redis, claim: Callable[[redis.Redis, Attempt], tuple[bytes, int, int]]
) -> None:
    run = b"run:1"  # as claim_jobs names the first job its call takes, with prefix "run"
    for replaced, ended, cancelled in itertools.product([False, True], repeat=3):
        state = (replaced, ended, cancelled)
        attempt = a_stream(r, replaced, ended, cancelled)
        before = r.hgetall(attempt.meta_key)
        outcome, now, entries = claim(r, attempt)
        after = r.hgetall(attempt.meta_key)
        due = r.zscore(DUE_KEY, attempt.stream_id)
        mine = r.sismember(jobs_key(ME), attempt.job)
        orphan = r.zscore(ORPHANS_KEY, attempt.job) is not None
        r.delete(attempt.meta_key, jobs_key(ME))
        r.zrem(DUE_KEY, attempt.stream_id)
        r.zrem(ORPHANS_KEY, attempt.job)

        if replaced or ended:
            assert (outcome, after, due, mine) == (b"gone", before, None, 0), state
        else:
            assert outcome == (b"cancelled" if cancelled else b"claimed"), state
            assert entries == 0  # entries in the stream: none yet
            assert after == {
                **before,
                b"worker": ME.encode(),
                b"started": str(now).encode(),
                b"claim": run,
            }
            assert due == now + DEADLINE_MS  # the supervisor looks again at its deadline
            assert (mine, orphan) == (1, False), state


def test_a_withdrawal_ends_a_stream_exactly_when_its_attempt_still_waits(r: redis.Redis) -> None:
    _, payload = encode(GONE)
    for replaced, ended, claimed in itertools.product([False, True], repeat=3):
        state = (replaced, ended, claimed)
        attempt = a_stream(r, replaced, ended, cancelled=False)
        queue, waiting = f"queue-{attempt.stream_id}", f"waiting-{attempt.stream_id}"
        r.zadd(queue, {attempt.job: 1})
        r.zadd(waiting, {attempt.job: 1})
        r.set(job_key(attempt.job), "record")
        if claimed:
            r.set(in_progress_key(attempt.job), "1")
        withdrawn = r.register_script(lua("withdraw"))(
            keys=[
                in_progress_key(attempt.job),
                queue,
                waiting,
                job_key(attempt.job),
                attempt.stream_key,
                attempt.meta_key,
            ],
            args=[attempt.job, payload, 60],
        )
        entries = [from_fields(fields) for _, fields in r.xrange(attempt.stream_key)]
        still_queued = r.zscore(queue, attempt.job) is not None
        assert still_queued == (r.zscore(waiting, attempt.job) is not None), state
        r.delete(attempt.meta_key, attempt.stream_key, queue, waiting, job_key(attempt.job))
        r.delete(in_progress_key(attempt.job))

        if claimed:  # a worker has it: nothing changes
            assert (withdrawn, entries, still_queued) == (0, [], True), state
        elif replaced or ended:  # out of arq's hands, but the fence refuses the end
            assert (withdrawn, entries, still_queued) == (0, [], False), state
        else:
            assert (withdrawn, entries, still_queued) == (1, [GONE], False), state
