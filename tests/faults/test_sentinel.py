"""Redis behind Sentinel fails over while streams are open (issue 24): every stream ends with
its whole answer, or with a `redis_failover` error and `[DONE]` after a prefix of it; never a
hang, a gap or a repeat. New requests are refused with 503 and `Retry-After` during the election
and served after it, `/ready` says `redis` meanwhile, and no process restarts.

Everything is real and the test's own: a master, a replica and three Sentinels (redis-server,
TLS-only data nodes with a password, Sentinels with a password of their own), `sluice api` and
`sluice worker` processes pointed at the Sentinels, and faults made for real: SIGKILL, `SENTINEL
FAILOVER`, `DEBUG SLEEP`, a killed master started again. The scenarios share one cluster, in
order; each leaves it whole (a master and a replica in step) for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.faults.conftest import FAST_LIVENESS
from tests.procs import (
    SENTINEL_MASTER,
    Secured,
    SentinelCluster,
    Stack,
    start_stack,
    wait_until,
)
from tests.sse import SSEResult, parse_sse, stream
from tests.tls import make_certificates
from worker.backends.synthetic import PASSAGE, words

ROOT = Path(__file__).parents[2]
SYNTHETIC_DB = 1
STREAMS = 8
TOKENS = 40
RATE = "20"  # tokens/s: each stream takes 2 s, so a failover falls in the middle of all eight
DOWN_AFTER_MS = 1000
FAILOVER_S = 15.0  # SLUICE_REDIS_FAILOVER_S: far above any failover here
MASTER_WAIT_S = 30.0
"""A bound on every wait for the Sentinels in this module: a stream must end well before."""
measured: dict[str, dict[str, Any]] = {}
"""Per scenario, what the note reports: outcomes and the time until requests were served."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    directory = tmp_path_factory.mktemp("sentinel")
    secured = Secured(make_certificates(directory), "data-secret", "sentinel-secret")
    cluster = SentinelCluster(directory, down_after_ms=DOWN_AFTER_MS, secured=secured).start()
    yield cluster
    cluster.stop()
    for scenario, figures in measured.items():
        print(f"\n{scenario}: {figures}")


def sentinel_stack(cluster: SentinelCluster, name: str, db: int, **settings: str) -> Stack:
    return start_stack(
        name,
        cluster.url(db),
        1,
        **{**FAST_LIVENESS, "redis_failover_s": str(FAILOVER_S), **cluster.env(), **settings},
    )


@pytest.fixture(scope="module")
def stack(cluster: SentinelCluster) -> Iterator[Stack]:
    stack = sentinel_stack(
        cluster, "sentinel", SYNTHETIC_DB, backend="synthetic", synthetic_tokens_per_s=RATE
    )
    yield stack
    stack.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        yield client


def answer(prompt: str) -> str:
    """The synthetic backend's whole answer to `prompt`, at `TOKENS` tokens."""
    return "".join(w.decode() for w in words(f"You asked: {prompt}\n\n{PASSAGE}")[:TOKENS])


@dataclass
class Served:
    """What new requests met from the fault on: refused, then served."""

    refused: list[tuple[int, str | None, str | None]] = field(default_factory=list)
    """(status, Retry-After, error code) of each request refused."""
    lost: int = 0
    """Requests admitted, then ended `redis_failover` before a token (lost with the master)."""
    not_ready: list[list[str]] = field(default_factory=list)
    """`reasons` of each 503 from /ready."""
    served_after_s: float | None = None
    """From the fault to the end of the first request, begun after it, served whole."""


async def until_served(client: httpx.AsyncClient, since: float) -> Served:
    """From the fault on, a new request every 200 ms, each on its own (one may wait on a
    frozen master while the next is refused), and /ready as often, until one is served."""
    seen = Served()
    served = asyncio.Event()

    async def request() -> None:
        body = {"prompt": "after", "stream": True, "max_tokens": 2}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                code = json.loads(await response.aread())["error"]["code"]
                seen.refused.append(
                    (response.status_code, response.headers.get("retry-after"), code)
                )
                return
            lines = [line async for line in response.aiter_lines()]
        result = SSEResult(200, response.headers, *parse_sse(lines))
        assert result.events[-1].data == "[DONE]"
        if result.errors:
            assert [e["code"] for e in result.errors] == ["redis_failover"], result.errors
            assert result.text == ""
            seen.lost += 1
            return
        if seen.served_after_s is None:
            seen.served_after_s = round(time.monotonic() - since, 2)
        served.set()

    async def ready() -> None:
        answer = await client.get("/ready")
        if answer.status_code == 503:
            seen.not_ready.append(answer.json()["reasons"])

    probes: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(MASTER_WAIT_S):
            while not served.is_set():
                probes += [asyncio.create_task(request()), asyncio.create_task(ready())]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await served.wait()
            # Every probe ends (none hangs), within a socket timeout and the election.
            await asyncio.gather(*probes)
    except TimeoutError:
        raise AssertionError(f"no request served within {MASTER_WAIT_S} s: {seen}") from None
    return seen


async def ready_again(client: httpx.AsyncClient, since: float) -> float:
    """Seconds from `since` until /ready is 200 again (its loops back in step: a loop that
    failed while Redis was away counts as restarting until it has run a second)."""
    deadline = since + MASTER_WAIT_S
    while (ready := await client.get("/ready")).status_code != 200:
        assert time.monotonic() < deadline, ready.json()
        await asyncio.sleep(0.1)
    return round(time.monotonic() - since, 2)


async def open_streams(client: httpx.AsyncClient, tag: str) -> list[asyncio.Task[SSEResult]]:
    """`STREAMS` streams, each under way (its first tokens read) when this returns."""
    prompts = [f"{tag} {n}" for n in range(STREAMS)]
    body = {"stream": True, "max_tokens": TOKENS}
    tasks = [asyncio.create_task(stream(client, {"prompt": p, **body})) for p in prompts]
    await asyncio.sleep(0.7)  # a third of each stream
    assert not any(task.done() for task in tasks)
    return tasks


def outcome(result: SSEResult, whole: str) -> str:
    """`complete`, or `redis_failover` after a prefix of the answer; anything else fails."""
    assert result.status == 200
    assert result.events[-1].data == "[DONE]", result.events[-3:]
    if not result.errors:
        assert result.text == whole
        return "complete"
    assert [e["code"] for e in result.errors] == ["redis_failover"], result.errors
    assert whole.startswith(result.text), (result.text, whole)
    return "redis_failover"


async def resume(client: httpx.AsyncClient, result: SSEResult, whole: str) -> str:
    """A resume after the fault, from the last event the client had: the rest of the answer
    exactly (`continued`, `done` for a stream that had ended), or `redis_failover`. A resume is
    a request like any other: while a Sentinel still reports the failover under way it gets 503
    with `Retry-After`, and the client asks again then, as README's failover table says."""
    stream_id = result.headers["x-sluice-stream-id"]
    last = [e.id for e in result.events if e.id][-1]
    deadline = time.monotonic() + MASTER_WAIT_S
    while True:
        rest = await stream(
            client, path=f"/v1/streams/{stream_id}", headers={"Last-Event-ID": last}
        )
        if rest.status != 503 or time.monotonic() > deadline:
            break
        assert "retry-after" in rest.headers
        await asyncio.sleep(0.2)
    assert rest.status == 200
    assert rest.events[-1].data == "[DONE]"
    if not result.errors:
        assert rest.events == [rest.events[-1]]  # it had ended: nothing but [DONE]
        return "done"
    if not rest.errors:
        assert result.text + rest.text == whole
        return "continued"
    assert [e["code"] for e in rest.errors] == ["redis_failover"], rest.errors
    assert whole.startswith(result.text + rest.text)
    return "redis_failover"


async def settle(
    client: httpx.AsyncClient,
    cluster: SentinelCluster,
    stack: Stack,
    tasks: list[asyncio.Task[SSEResult]],
    tag: str,
    fault_at: float,
) -> dict[str, Any]:
    """Every stream's outcome (each within the failover time and 10 s), their resumes, a new
    request served, and no process restarted."""
    served = await until_served(client, fault_at)
    async with asyncio.timeout(MASTER_WAIT_S + 10):
        results = await asyncio.gather(*tasks)
    ended_after_s = round(time.monotonic() - fault_at, 2)
    ready_after_s = await ready_again(client, fault_at)
    wholes = [answer(f"{tag} {n}") for n in range(STREAMS)]
    outcomes = [outcome(r, whole) for r, whole in zip(results, wholes, strict=True)]
    resumes = [await resume(client, r, w) for r, w in zip(results, wholes, strict=True)]
    assert all(proc.alive() for proc in (stack.api, *stack.workers))
    # What the clients were told is on the new master, whole: nothing was written elsewhere.
    with cluster.client(cluster.master_port(), db=SYNTHETIC_DB) as new_master:
        for result in results:
            stored = new_master.xrange(f"sluice:stream:{result.headers['x-sluice-stream-id']}")
            assert [e.id for e in result.events if e.id][-1] in [i.decode() for i, _ in stored]
    assert served.refused, "no request was refused during the election"
    for status, retry_after, code in served.refused:
        assert status == 503, (status, code)
        assert retry_after, code
    return {
        "streams": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "resumes": {o: resumes.count(o) for o in sorted(set(resumes))},
        "served_after_s": served.served_after_s,
        "all_ended_after_s": ended_after_s,
        "ready_after_s": ready_after_s,
        "refused": sorted({f"{s} {c}" for s, _, c in served.refused}),
        "admitted_then_lost": served.lost,
        "not_ready": sorted({r for reasons in served.not_ready for r in reasons}),
    }


def test_the_workers_health_checks_find_their_worker_through_the_sentinels(
    cluster: SentinelCluster, stack: Stack
) -> None:
    """compose's healthcheck and the k8s probe, run as the containers run them, with the
    stack's settings, where SLUICE_REDIS_URL's host and port lead nowhere: with Sentinels they
    are not used."""
    nowhere = re.sub(r"@127\.0\.0\.1:\d+/", "@127.0.0.1:1/", stack.redis_url)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environment |= {**stack.env, "SLUICE_REDIS_URL": nowhere, "PYTHONPATH": str(ROOT)}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    healthcheck = compose["services"]["worker"]["healthcheck"]["test"][3]
    probe = ROOT / "deploy" / "k8s" / "base" / "worker_alive.py"
    for command in ([sys.executable, "-c", healthcheck], [sys.executable, str(probe)]):
        done = subprocess.run(command, env=environment, timeout=30, check=False)
        assert done.returncode == 0, command


async def test_master_killed_with_streams_open_then_it_comes_back_as_a_replica(
    cluster: SentinelCluster, stack: Stack, client: httpx.AsyncClient
) -> None:
    old = cluster.master_port()
    tasks = await open_streams(client, "killed")
    cluster.nodes[old].signal(signal.SIGKILL)
    fault_at = time.monotonic()
    figures = await settle(client, cluster, stack, tasks, "killed", fault_at)
    new = cluster.master_port()
    measured["SIGKILL of the master"] = figures

    assert new != old
    assert "redis" in figures["not_ready"]

    # The killed node comes back, empty (no persistence), as a replica of the new master, and
    # copies it whole (a full sync) while streams go on. (A master that comes back still
    # saying it is the master, until the Sentinels make it a replica, is the frozen one's
    # case, below.)
    cluster.restart(old, "--replicaof", "127.0.0.1", str(new))
    comeback = await open_streams(client, "comeback")
    await asyncio.to_thread(lambda: cluster.wait_replicated(new, timeout=MASTER_WAIT_S))
    results = await asyncio.gather(*comeback)
    comeback_outcomes = [outcome(r, answer(f"comeback {n}")) for n, r in enumerate(results)]
    measured["the killed master back as a replica"] = {
        "streams": {o: comeback_outcomes.count(o) for o in sorted(set(comeback_outcomes))}
    }

    assert cluster.role(old) == "slave"
    assert comeback_outcomes == ["complete"] * STREAMS
    assert all(proc.alive() for proc in (stack.api, *stack.workers))


async def test_a_graceful_failover_with_streams_open(
    cluster: SentinelCluster, stack: Stack, client: httpx.AsyncClient
) -> None:
    old = cluster.master_port()
    tasks = await open_streams(client, "graceful")
    with cluster.sentinels[0].client() as sentinel:
        sentinel.execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)
    fault_at = time.monotonic()
    figures = await settle(client, cluster, stack, tasks, "graceful", fault_at)
    measured["SENTINEL FAILOVER"] = figures

    new = cluster.master_port()
    assert new != old
    # The Sentinels make the old master a replica of the new one once they next look at it
    # (their INFO period, 10 s); told so now, as they would, the next scenario need not wait.
    with cluster.client(old) as demoted:
        demoted.replicaof("127.0.0.1", new)
    await asyncio.to_thread(lambda: cluster.wait_replicated(new))


@pytest.mark.model
async def test_master_killed_with_the_real_model_streaming(cluster: SentinelCluster) -> None:
    """Greedy answers are the same alone and in a batch (README, Continuous batching): the one
    answer read before the fault is what each of the eight streams must be, or start with.
    New requests wait behind the eight for the worker's slots, so they are asked one at a
    time."""
    # One thread: llama.cpp with every core slows by far more than its share when something
    # else runs beside it (README, Continuous batching), as the stack's own processes do here.
    model = sentinel_stack(cluster, "sentinel-model", 2, backend="llama", n_threads="1")
    body = {
        "messages": [{"role": "user", "content": "Name three uses of a queue."}],
        "stream": True,
        "max_tokens": 32,
        "temperature": 0,
    }
    killed: int | None = None
    try:
        async with httpx.AsyncClient(base_url=model.base_url, timeout=120) as client:
            reference = await stream(client, body)
            assert reference.errors == []
            assert reference.text
            tasks = [asyncio.create_task(stream(client, body)) for _ in range(STREAMS)]
            old = cluster.master_port()
            await asyncio.to_thread(lambda: every_stream_under_way(cluster, old, 2))
            cluster.nodes[old].signal(signal.SIGKILL)
            killed = old
            fault_at = time.monotonic()
            await asyncio.to_thread(cluster.wait_for_new_master, old, MASTER_WAIT_S)
            refused = []
            while (again := await stream(client, {**body, "max_tokens": 2})).status != 200:
                assert again.status == 503
                refused.append(round(time.monotonic() - fault_at, 1))
                assert time.monotonic() < fault_at + MASTER_WAIT_S
                await asyncio.sleep(0.2)
            served_after_s = round(time.monotonic() - fault_at, 2)
            assert again.errors == []
            results = await asyncio.gather(*tasks)
            outcomes = [outcome(r, reference.text) for r in results]
            resumes = [await resume(client, r, reference.text) for r in results]
            assert all(proc.alive() for proc in (model.api, *model.workers))
    finally:
        model.stop()
        if killed is not None:  # back as a replica, whatever happened: the next test needs one
            master = await asyncio.to_thread(cluster.wait_for_new_master, killed, MASTER_WAIT_S)
            cluster.restart(killed, "--replicaof", "127.0.0.1", str(master))
            await asyncio.to_thread(lambda: cluster.wait_replicated(master))
    measured["SIGKILL of the master, real model"] = {
        "streams": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "resumes": {o: resumes.count(o) for o in sorted(set(resumes))},
        "served_after_s": served_after_s,
        "refused": refused,
    }


def every_stream_under_way(cluster: SentinelCluster, master: int, db: int) -> None:
    """Until `STREAMS` streams have their first token stored, and not their end."""

    def under_way() -> bool:
        with cluster.client(master, db) as r:
            ids = [k.decode().rpartition(":")[2] for k in r.scan_iter("sluice:stream:*")]
            going = [i for i in ids if not r.hexists(f"sluice:meta:{i}", "ended")]
            return sum(r.xlen(f"sluice:stream:{i}") >= 2 for i in going) >= STREAMS

    wait_until(under_way, MASTER_WAIT_S, "every stream's first tokens")


async def test_a_master_frozen_past_down_after_with_streams_open(
    cluster: SentinelCluster, stack: Stack, client: httpx.AsyncClient
) -> None:
    """`DEBUG SLEEP` freezes the master for 4 s (Sentinels give up on it after 1 s): its
    connections hang, then it wakes still saying it is the master, the Sentinels' old one,
    until they make it a replica (at their next look, up to 10 s later): sluice never goes back
    to it."""
    old = cluster.master_port()
    tasks = await open_streams(client, "frozen")

    def freeze() -> None:
        with cluster.client(old) as frozen, contextlib.suppress(Exception):
            frozen.execute_command("DEBUG", "SLEEP", "4")

    freezing = asyncio.create_task(asyncio.to_thread(freeze))
    fault_at = time.monotonic()
    figures = await settle(client, cluster, stack, tasks, "frozen", fault_at)
    await freezing
    measured["DEBUG SLEEP past down-after"] = figures

    assert cluster.master_port() != old
    assert "redis" in figures["not_ready"]
    # Awake, it still says it is the master until the Sentinels next look at it (up to 10 s
    # later): new streams go to the new one all the same.
    late = await asyncio.gather(*await open_streams(client, "awake"))
    late_outcomes = [outcome(r, answer(f"awake {n}")) for n, r in enumerate(late)]
    assert late_outcomes == ["complete"] * STREAMS
    with cluster.client(old, db=SYNTHETIC_DB) as awake:
        if cluster.role(old) == "master":  # (not yet told otherwise)
            ids = [r.headers["x-sluice-stream-id"] for r in late]
            assert not any(awake.exists(f"sluice:meta:{i}") for i in ids)
