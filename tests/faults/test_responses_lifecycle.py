"""Stored responses keep their promises whatever happens around them: a background one runs to
its end whoever reads, a foreground one stops when its client leaves, a stored one outlives
the process that created it, and a relay that fails tells the client where to resume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
from typing import Any

import httpx
import pytest
import redis

from shared.protocol import READERS_KEY, Failed, Token, stream_key
from tests.faults.conftest import StackFactory
from tests.faults.test_supervision import ended, entries
from tests.faults.test_workers import db_client
from tests.procs import Stack, eventually

ANSWER = {"input": "tell me about queues", "max_output_tokens": 30}


async def _wait_done(client: httpx.AsyncClient, resp_id: str, within_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        response = (await client.get(f"/v1/responses/{resp_id}")).json()
        if response["status"] not in ("queued", "in_progress"):
            return dict(response)
        await asyncio.sleep(0.1)
    raise TimeoutError(resp_id)


async def test_a_background_response_runs_to_its_end_though_the_readers_key_expires(
    make_stack: StackFactory,
) -> None:
    """API processes give `sluice:readers` a TTL of a minute from their last reader: a quiet
    deployment lets it expire. A background response must not go with it."""
    stack = make_stack(workers=1, synthetic_tokens_per_s="10", resume_grace_s="0.5")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        created = (await client.post("/v1/responses", json=ANSWER | {"background": True})).json()
        with db_client(stack) as r:
            for _ in range(10):  # as the key's expiry would, whenever it comes
                r.delete(READERS_KEY)
                await asyncio.sleep(0.2)
        done = await _wait_done(client, created["id"], 15)

    assert done["status"] == "incomplete"  # it ran to its max_output_tokens
    assert len(done["output_text"].split()) == 30


async def test_a_foreground_response_whose_client_leaves_stops_generating(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="10", worker_max_jobs="1")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=1) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/responses", json={"input": "take your time"})
    with db_client(stack) as r:
        stream_id = await eventually(lambda: _only_stream(r), "the stream")
        await eventually(lambda: ended(r, stream_id), "generation to stop")
        found = entries(r, stream_id)

    assert isinstance(found[-1], Failed)
    assert found[-1].error["code"] == "cancelled"
    assert sum(isinstance(e, Token) for e in found) < 40  # the whole answer takes 8 s


async def test_a_stored_response_outlives_its_stream_ttl_when_its_creator_is_gone(
    make_stack: StackFactory,
) -> None:
    """Created on one API process, which is killed at once; its stream ends on a worker and
    would expire after 2 s (`SLUICE_STREAM_TTL_S`): the response is still whole long after."""
    stack = make_stack(workers=1, synthetic_tokens_per_s="40", stream_ttl_s="2")
    creator, creator_url = stack.add_replica()
    async with httpx.AsyncClient(base_url=creator_url, timeout=30) as client:
        created = (await client.post("/v1/responses", json=ANSWER | {"background": True})).json()
    creator.signal(signal.SIGKILL)
    stream_id = created["id"].removeprefix("resp_")
    with db_client(stack) as r:  # not through the API: a read there must not be what keeps it
        await eventually(lambda: ended(r, stream_id), "the response to end")
    await asyncio.sleep(3)  # past the stream TTL
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        later = (await client.get(f"/v1/responses/{created['id']}")).json()
        replay = await client.get(f"/v1/responses/{created['id']}?stream=true")

    assert later["status"] == "incomplete"
    assert len(later["output_text"].split()) == 30
    assert '"type":"response.incomplete"' in replay.text


async def test_a_relay_error_takes_the_last_events_number_so_a_resume_after_it_loses_nothing(
    make_stack: StackFactory,
) -> None:
    """The API's stream reader loses its Redis connection mid-answer, and the new one too (a
    single cut is made again at once): the client gets an `error` event and the stream closes.
    Resuming `starting_after` the error's number gives exactly the events it had not seen."""
    stack = make_stack(workers=1, synthetic_tokens_per_s="20")
    body = ANSWER | {"stream": True, "max_output_tokens": 60}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        first: list[dict[str, Any]] = []
        cutting = ReadCutter(stack)
        async with client.stream("POST", "/v1/responses", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                first.append(json.loads(line[6:]))
                if sum(e["type"] == "response.output_text.delta" for e in first) == 10:
                    cutting.start()
        cutting.stop()
        error = first[-1]
        resp_id = first[0]["response"]["id"]
        done = await _wait_done(client, resp_id, 15)
        rest = await client.get(
            f"/v1/responses/{resp_id}?stream=true&starting_after={error['sequence_number']}"
        )
    later = [json.loads(line[6:]) for line in rest.text.splitlines() if line.startswith("data: ")]
    deltas = [e["delta"] for e in [*first, *later] if e["type"] == "response.output_text.delta"]

    assert error["type"] == "error"
    assert error["sequence_number"] == first[-2]["sequence_number"]
    assert later[0]["sequence_number"] == error["sequence_number"] + 1
    assert "".join(deltas) == done["output_text"]


async def test_responses_are_counted_in_the_gateways_metrics(make_stack: StackFactory) -> None:
    stack = make_stack(workers=1, synthetic_tokens_per_s="400")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        before = _finished(await client.get("/metrics"))
        await client.post("/v1/responses", json={"input": "count me"})
        after = _finished(await client.get("/metrics"))

    assert after == before + 1


def _finished(metrics: httpx.Response) -> float:
    found = re.search(r'^sluice_requests_total\{.*outcome="stop"\} (\S+)$', metrics.text, re.M)
    return float(found[1]) if found else 0.0


class ReadCutter:
    """Closes the connection of the stack's stream reader (its XREADs, on its database) every
    few milliseconds while it runs, so that a call made again on a new connection is cut too."""

    def __init__(self, stack: Stack) -> None:
        self._redis = db_client(stack)
        self._db = str(self._redis.connection_pool.connection_kwargs.get("db", 0))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._cut)

    def _cut(self) -> None:
        while not self._stopped.wait(0.005):
            for client in self._redis.client_list():
                if client.get("cmd") == "xread" and client.get("db") == self._db:
                    with contextlib.suppress(redis.ResponseError):  # gone meanwhile
                        self._redis.client_kill_filter(_id=client["id"])

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self._redis.close()


def _only_stream(r: redis.Redis) -> str:
    keys = list(r.scan_iter(stream_key("*")))
    return keys[0].decode().removeprefix(stream_key("")) if len(keys) == 1 else ""
