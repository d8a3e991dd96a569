"""A worker's Redis connections stay bounded however many jobs it runs (issue 15).

One worker runs 500 synthetic jobs at once, each stream open from its first event to its last,
while its connections to Redis are counted from its own process's sockets (so the count does
not depend on the code under test naming them).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator

import httpx
import psutil
import pytest

from shared.redis_url import WORKER_CLIENT_NAME
from shared.settings import Settings
from tests.procs import RedisServer, Stack, start_stack
from tests.sse import SSEResult, stream
from worker.backends.synthetic import PASSAGE, words

JOBS = 500
TOKENS = 12
RATE = "1"  # tokens/s: each job runs 12 s, well past the time opening every stream takes
BOUND = 16
DB = 20


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    stack = start_stack(
        "connections",
        redis_server.url(DB),
        1,
        backend="synthetic",
        synthetic_tokens_per_s=RATE,
        worker_max_jobs=str(JOBS),
        max_queue=str(JOBS),
        access_log="false",
    )
    yield stack
    stack.stop()


def redis_connections(pid: int, redis_port: int) -> int:
    """The process's established TCP connections to Redis."""
    return sum(
        c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
        for c in psutil.Process(pid).net_connections("tcp")
    )


class PeakConnections(threading.Thread):
    """Samples a process's Redis connections every 50 ms until stopped (in a thread, so that
    the streams' event loop is not held up)."""

    def __init__(self, pid: int, redis_port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.redis_port = pid, redis_port
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, redis_connections(self.pid, self.redis_port))

    def stop(self) -> None:
        self.done.set()
        self.join()


def entry_ms(result: SSEResult, at: int) -> int:
    """The Redis time (ms) of the stream entry behind the `at`-th event that has an id."""
    entry_id = [e.id for e in result.events if e.id][at]
    return int(entry_id.split("-")[0])


async def test_a_worker_running_500_jobs_at_once_holds_at_most_16_redis_connections(
    stack: Stack, redis_server: RedisServer
) -> None:
    tls = ssl.create_default_context()  # one for all clients: building one each takes seconds

    async def job(i: int) -> SSEResult:
        body = {"prompt": f"job {i}", "stream": True, "max_tokens": TOKENS}
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60, verify=tls) as client:
            return await stream(client, body)

    sampler = PeakConnections(stack.workers[0].pid, redis_server.port)
    sampler.start()
    try:
        results = await asyncio.gather(*(job(i) for i in range(JOBS)))
    finally:
        sampler.stop()

    for i, result in enumerate(results):
        assert result.status == 200
        assert result.events[-1].data == "[DONE]"
        assert not result.errors
        assert result.text == b"".join(words(f"You asked: job {i}\n\n{PASSAGE}")[:TOKENS]).decode()
    # Every job had started (its first entry) before any had ended (its last): all ran at once.
    assert max(entry_ms(r, 0) for r in results) < min(entry_ms(r, -1) for r in results)
    assert Settings.model_fields["worker_redis_connections"].default == BOUND
    assert 2 <= sampler.peak <= BOUND


def test_a_workers_redis_connections_carry_its_name(
    stack: Stack, redis_server: RedisServer
) -> None:
    with redis_server.client() as r:
        named = [
            c
            for c in r.client_list()
            if c["name"].startswith(f"{WORKER_CLIENT_NAME}:") and c["db"] == str(DB)
        ]

    assert len({c["name"] for c in named}) == 1
    assert len(named) == redis_connections(stack.workers[0].pid, redis_server.port)
