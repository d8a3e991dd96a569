"""Heartbeats a worker's health probe must judge, written into Redis as workers write theirs.

The k8s liveness probe (deploy/k8s/base/worker_alive.py, tests/test_k8s.py) and compose's worker
healthcheck (compose.yaml, tests/test_deploy.py) run on the worker's own host and must pass only
while that host's worker beats: never for another host's worker, however fresh, nor for a beat
older than the API would count as alive.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from shared.protocol import WORKERS_KEY, worker_ttl_ms
from shared.settings import Settings
from tests.procs import RedisServer

DB = 8
"""Emptied for each case (`RedisServer.fresh_url`)."""
HOST = socket.gethostname()
THIS_HOSTS = f"{HOST}-4242-abcdef"
"""A worker id as this host's worker would have it (shared.protocol.new_worker_id)."""
ANOTHER_HOSTS = "another-host-4242-abcdef"
LONGER_NAMED_HOSTS = f"{HOST}-1-4242-abcdef"
"""A worker on a host whose name starts with this one's (`worker-1` beside `worker`)."""
WINDOW_MS = worker_ttl_ms(Settings.model_fields["heartbeat_s"].default)
"""How long a worker counts as alive after its last beat, at the default heartbeat: for the API,
the k8s probe (the tests set no SLUICE_HEARTBEAT_S) and compose's healthcheck alike."""
PAST_WINDOW_MS = 1000
"""How much older than `WINDOW_MS` a stale beat is."""


@dataclass(frozen=True)
class Beats:
    """Workers' last beats: `fresh` ones at Redis's now, `stale` ones past `WINDOW_MS`."""

    name: str
    fresh: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()
    alive: bool = False
    """Whether the probe on this host must pass."""

    def write(self, redis_server: RedisServer) -> str:
        """The URL of a database holding these beats and no other."""
        url = redis_server.fresh_url(DB)
        with redis_server.client(DB) as client:
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            old_ms = now_ms - WINDOW_MS - PAST_WINDOW_MS
            beats = {w: now_ms for w in self.fresh} | {w: old_ms for w in self.stale}
            if beats:
                client.zadd(WORKERS_KEY, beats)
        return url


CASES = [
    Beats("this-host-fresh", fresh=(THIS_HOSTS,), alive=True),
    Beats("none"),
    Beats("this-host-stale", stale=(THIS_HOSTS,)),
    Beats("another-host-fresh", fresh=(ANOTHER_HOSTS,)),
    Beats("longer-named-host-fresh", fresh=(LONGER_NAMED_HOSTS,)),
    Beats("this-host-stale-another-fresh", fresh=(ANOTHER_HOSTS,), stale=(THIS_HOSTS,)),
]
CASE_IDS = [case.name for case in CASES]
