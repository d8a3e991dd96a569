"""The life of a stream: ids, resume anywhere, disconnects, cancel, keepalive, admission, TTLs."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis

from shared.keys import ANONYMOUS
from shared.protocol import (
    MODELS_KEY,
    Finished,
    Started,
    StreamMeta,
    Token,
    encode,
    meta_key,
    queue_name,
    stream_key,
)
from tests.procs import RedisServer, Stack, eventually, start_stack
from tests.sse import SSEResult, parse_sse, stream

DB = 5
PASSAGE_END = "will never come."
QUEUE = queue_name("synthetic")


@pytest.fixture(scope="module")
def slow(redis_server: RedisServer) -> Iterator[Stack]:
    """One worker, one job at a time, 20 tokens/s (a stream takes ~4 s), short timers."""
    stack = start_stack(
        "lifecycle",
        redis_server.url(DB),
        1,
        backend="synthetic",
        synthetic_tokens_per_s="20",
        worker_max_jobs="1",
        max_queue="1",
        ping_s="0.3",
        supervise_s="0.2",
        resume_grace_s="1.5",
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def replica(slow: Stack) -> str:
    """A second API process on the same Redis: a client may come back to either."""
    return slow.add_replica()[1]


@pytest.fixture
async def first(slow: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=slow.base_url, timeout=30) as c:
        yield c


@pytest.fixture
async def second(replica: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=replica, timeout=30) as c:
        yield c


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client(DB) as client:
        yield client


async def wait_idle(db: redis.Redis) -> None:
    """Until the one worker is free (nothing queued or running)."""
    await eventually(lambda: db.zcard(QUEUE) == 0, "the worker stayed busy")


def entry_id(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)


def prompt(text: str) -> dict[str, object]:
    return {"prompt": text, "stream": True}


async def stream_noting(
    client: httpx.AsyncClient, body: dict[str, object], comment: str, noted: asyncio.Future[str]
) -> SSEResult:
    """Read a stream to its end, as `stream` does; `noted` gets the stream's id when the first
    `comment` arrives."""
    lines: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            if line.startswith(":") and line[1:].strip() == comment and not noted.done():
                noted.set_result(response.headers["x-sluice-stream-id"])
        events, comments = parse_sse(lines)
        return SSEResult(response.status_code, response.headers, events, comments)


def last_entry(db: redis.Redis, stream_id: str) -> tuple[bytes, bytes]:
    """The stream's last entry: its kind and payload."""
    [(_, fields)] = db.xrevrange(f"sluice:stream:{stream_id}", count=1)
    [(kind, payload)] = fields.items()
    return kind, payload


async def test_every_event_has_an_id_and_the_header_names_the_stream(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    result = await stream(first, prompt("ids please"))

    stream_id = result.headers["x-sluice-stream-id"]
    assert {c["id"] for c in result.chunks} == {f"chatcmpl-{stream_id}"}
    assert all(e.id for e in result.events[:-1])
    assert result.events[-1].data == "[DONE]"


@pytest.mark.parametrize("cut", [1, 3, 10])
async def test_resume_on_another_api_process_loses_and_repeats_nothing(
    first: httpx.AsyncClient, second: httpx.AsyncClient, db: redis.Redis, cut: int
) -> None:
    await wait_idle(db)
    head = await stream(first, prompt(f"resume after {cut}"), cut_after=cut)
    stream_id = head.headers["x-sluice-stream-id"]

    tail = await stream(
        second, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": head.events[-1].id or ""}
    )

    whole = await stream(second, path=f"/v1/streams/{stream_id}")
    assert tail.events[-1].data == "[DONE]"
    assert head.text + tail.text == whole.text
    assert whole.text.endswith(PASSAGE_END)
    ids = [entry_id(e.id) for e in head.events + tail.events if e.id]
    assert ids == sorted(set(ids))  # each entry once, in order (a replay may coalesce tokens)


async def test_resume_survives_several_cuts_in_a_row(
    first: httpx.AsyncClient, second: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    part = await stream(first, prompt("many cuts"), cut_after=2)
    stream_id = part.headers["x-sluice-stream-id"]
    parts = [part]
    while parts[-1].events[-1].data != "[DONE]":
        client = second if len(parts) % 2 else first
        parts.append(
            await stream(
                client,
                path=f"/v1/streams/{stream_id}?after={parts[-1].events[-1].id}",
                cut_after=3,
            )
        )

    assert len(parts) > 3
    assert "".join(p.text for p in parts).endswith(PASSAGE_END)
    assert "".join(p.text for p in parts).startswith("You asked: many cuts")


async def test_unknown_stream_cannot_be_resumed(first: httpx.AsyncClient) -> None:
    response = await first.get("/v1/streams/0123456789abcdef")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "stream_not_found"


async def test_client_gone_past_the_grace_period_stops_the_worker_for_the_next_job(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    abandoned = await stream(first, prompt("nobody listens"), cut_after=2)
    stream_id = abandoned.headers["x-sluice-stream-id"]
    loop = asyncio.get_running_loop()
    started = loop.time()

    nxt = await stream(first, prompt("next in line"))

    kind, payload = last_entry(db, stream_id)
    assert kind == b"e"
    assert b"no client was reading" in payload
    assert nxt.text.endswith(PASSAGE_END)
    assert loop.time() - started < 4 + 4  # the abandoned one did not run its full ~4 s first


async def test_reader_back_within_the_grace_period_keeps_the_stream(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    head = await stream(first, prompt("brb"), cut_after=2)
    stream_id = head.headers["x-sluice-stream-id"]
    # Away until the supervisor has seen that nobody reads it: the grace period has begun.
    await eventually(lambda: db.hget(f"sluice:meta:{stream_id}", "unread"), "the reader missed")

    tail = await stream(first, path=f"/v1/streams/{stream_id}?after={head.events[-1].id}")

    assert not tail.errors
    assert (head.text + tail.text).endswith(PASSAGE_END)


async def test_cancel_from_another_replica_ends_the_stream_and_frees_the_worker(
    first: httpx.AsyncClient, second: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    reading = asyncio.create_task(stream(first, prompt("cancel me")))
    result_id = await _current_stream(db)
    await eventually(lambda: db.xlen(f"sluice:stream:{result_id}") >= 3, "a few tokens")

    cancelled = await second.post(f"/v1/streams/{result_id}/cancel")
    result: SSEResult = await reading

    assert cancelled.status_code == 200
    assert result.errors[-1]["code"] == "cancelled"
    assert result.events[-1].data == "[DONE]"
    assert not result.text.endswith(PASSAGE_END)
    await wait_idle(db)


async def _current_stream(db: redis.Redis) -> str:
    jobs = await eventually(lambda: db.zrange(QUEUE, 0, -1), "no running job")
    return str(jobs[0].decode().rpartition(".")[0])


async def test_cancel_of_a_finished_or_unknown_stream_answers_clearly(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    done = await stream(first, prompt("finish first"))

    finished = await first.post(f"/v1/streams/{done.headers['x-sluice-stream-id']}/cancel")
    unknown = await first.post("/v1/streams/nope/cancel")

    assert finished.status_code == 409
    assert finished.json()["error"]["code"] == "stream_finished"
    assert unknown.status_code == 404


async def test_queued_stream_gets_keepalive_comments_and_cancel_withdraws_it(
    first: httpx.AsyncClient, second: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    busy = asyncio.create_task(stream(first, prompt("occupy")))
    await _current_stream(db)
    keepalive: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    queued_task = asyncio.create_task(stream_noting(first, prompt("wait"), "queued", keepalive))
    queued_id = await asyncio.wait_for(keepalive, 10)

    cancelled = await second.post(f"/v1/streams/{queued_id}/cancel")
    queued = await queued_task
    # Checked while the one slot is still busy: once it is free, the worker would take (and so
    # remove) a job that was not withdrawn.
    worker_was_busy = not busy.done()
    job_record = db.exists(f"arq:job:{queued_id}.1")
    in_queue = db.zscore(QUEUE, f"{queued_id}.1")
    await busy

    assert cancelled.status_code == 200
    assert "queued" in queued.comments
    assert queued.errors[-1]["code"] == "cancelled"
    assert worker_was_busy
    assert not job_record
    assert in_queue is None


async def test_full_queue_gets_429_with_retry_after(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    busy = asyncio.create_task(stream(first, prompt("running")))
    await _current_stream(db)
    waiting = asyncio.create_task(stream(first, prompt("waiting")))
    await eventually(lambda: db.zcard(QUEUE) == 2, "the second job never queued")

    refused = await first.post("/v1/chat/completions", json=prompt("one too many"))
    await asyncio.gather(busy, waiting)

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1


async def test_resume_after_the_last_event_gets_done_at_once(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    await wait_idle(db)
    done = await stream(first, {"prompt": "short", "stream": True, "max_tokens": 3})
    stream_id = done.headers["x-sluice-stream-id"]

    again = await stream(
        first, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": done.events[-2].id or ""}
    )

    assert [e.data for e in again.events] == ["[DONE]"]


async def test_every_key_left_behind_has_a_ttl(db: redis.Redis) -> None:
    await wait_idle(db)

    def immortal() -> dict[bytes, int]:
        # Except the table of models ever served: one small hash, kept to tell a model whose
        # workers are gone (503) from one never served (404).
        keys = (k for k in db.scan_iter("*") if k != MODELS_KEY.encode())
        return {k: ttl for k in keys if (ttl := db.ttl(k)) == -1}

    # The last stream's end is tidied up by the supervisor's next pass.
    with contextlib.suppress(TimeoutError):
        await eventually(lambda: not immortal(), "every key to have a TTL")

    assert list(db.scan_iter("*")), "the lifecycle tests should have left streams behind"
    assert immortal() == {}


async def test_a_stream_just_claimed_resumes_before_its_first_entry_is_stored(
    first: httpx.AsyncClient, db: redis.Redis
) -> None:
    """A worker has claimed the job (the metadata names it) and its `Started` is on its way, not
    stored yet: a resume or a Responses stream opened then follows it; it is not `expired`."""
    stream_id = f"claimed{uuid.uuid4().hex}"
    meta = StreamMeta("chat.completion.chunk", 0, False, f"{stream_id}.1", ANONYMOUS, "synthetic")
    db.hset(meta_key(stream_id), mapping={**meta.fields(), "worker": "a-worker"})
    db.expire(meta_key(stream_id), 60)

    async def store_entries_soon() -> None:
        await asyncio.sleep(0.5)
        entries = (Started("a-worker", 1, 0), Token("late"), Finished("stop", 1, 1))
        for n, entry in enumerate(entries, start=1):  # numbered as the fenced append does
            db.xadd(
                stream_key(stream_id), dict([encode(entry)]), id=f"{int(time.time() * 1000)}-{n}"
            )
        db.expire(stream_key(stream_id), 60)

    storing = asyncio.create_task(store_entries_soon())
    resumed = await stream(first, path=f"/v1/streams/{stream_id}")
    await storing

    assert resumed.status == 200
    assert resumed.text == "late"
    assert resumed.events[-1].data == "[DONE]"
