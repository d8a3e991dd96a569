"""Giving a job back (shared/lua/hand_back.lua), against a real Redis, in every
state a stream can be in: a worker gives a job back only if the job is still its own current
attempt, has written no token, has an attempt left and another worker serving the model is
alive; and only then does the stream's metadata change."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Literal

import pytest
import redis

from shared.protocol import (
    MAX_ATTEMPTS,
    ORPHANS_KEY,
    Attempt,
    Failed,
    Started,
    Token,
    encode,
    job_id,
    jobs_key,
    serving_key,
)
from shared.scripts import lua
from tests.procs import RedisServer

ME = "worker-me"
TTL_MS = 3000
Newest = Literal["none", "started", "token", "end"]
ENTRIES = {
    "started": Started(ME, 3, None),
    "token": Token("a"),
    "end": Failed({"message": "ended", "type": "server_error", "param": None, "code": None}),
}


@pytest.fixture(scope="module")
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url()) as client:
        yield client


Presence = Literal["absent", "alive", "stale"]
"""A worker in the model's serving set: not there, heard from now, or not for a long while."""


def hand_back(
    r: redis.Redis,
    mine: int,
    replaced: bool,
    ended: bool,
    runs_it: str | None,
    newest: Newest,
    others: dict[str, Presence],
) -> tuple[bool, dict[bytes, bytes], dict[bytes, bytes]]:
    """One stream in that state; whether the script gave it back, and its metadata before and
    after."""
    stream_id = f"hand-back-{uuid.uuid4().hex}"
    attempt = Attempt(stream_id, job_id(stream_id, mine))
    model = f"model-{stream_id}"
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    current = mine + 1 if replaced else mine
    meta = {"job": job_id(stream_id, current)} | ({"ended": now_ms} if ended else {})
    r.hset(attempt.meta_key, mapping=meta | ({"worker": runs_it} if runs_it else {}))
    if newest != "none":
        kind, payload = encode(ENTRIES[newest])
        r.xadd(attempt.stream_key, {kind: payload})
    for worker, presence in others.items():
        if presence != "absent":
            heard = now_ms if presence == "alive" else now_ms - 10 * TTL_MS
            r.zadd(serving_key(model), {worker: heard})
    before = r.hgetall(attempt.meta_key)
    r.sadd(jobs_key(ME), attempt.job)
    given_back = r.register_script(lua("hand_back"))(
        keys=[attempt.meta_key, attempt.stream_key, serving_key(model), jobs_key(ME)],
        args=[attempt.job, ME, TTL_MS, MAX_ATTEMPTS],
    )
    after = r.hgetall(attempt.meta_key)
    orphaned = r.zscore(ORPHANS_KEY, attempt.job) == 0
    still_mine = r.sismember(jobs_key(ME), attempt.job)
    assert (orphaned, still_mine) == ((True, False) if given_back else (False, True))
    r.delete(attempt.meta_key, attempt.stream_key, serving_key(model), jobs_key(ME))
    r.zrem(ORPHANS_KEY, attempt.job)
    return bool(given_back), before, after


def test_a_job_is_given_back_exactly_when_it_may_be(r: redis.Redis) -> None:
    """Every state, not a sample: there are few (864), and a missed one is a wrong answer."""
    presences: list[Presence] = ["absent", "alive", "stale"]
    newests: list[Newest] = ["none", "started", "token", "end"]
    for mine, replaced, ended, runs_it, newest, other, me_too in itertools.product(
        range(1, MAX_ATTEMPTS + 1),
        [False, True],
        [False, True],
        [ME, "worker-other", None],
        newests,
        presences,
        presences,
    ):
        state = (mine, replaced, ended, runs_it, newest, other, me_too)
        given_back, before, after = hand_back(
            r, mine, replaced, ended, runs_it, newest, {"worker-a": other, ME: me_too}
        )
        may = (
            not replaced
            and not ended
            and runs_it == ME
            and mine < MAX_ATTEMPTS
            and newest in ("none", "started")
            and other == "alive"
        )
        assert given_back == may, state
        if may:
            assert after == {**before, b"worker": f"{ME} (gave the job back)".encode()}, state
        else:
            assert after == before, state
