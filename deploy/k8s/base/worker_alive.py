"""Exits 0 while this pod's worker beats in `sluice:workers`, 1 when it does not.

The worker's startup and liveness probes (deploy/k8s/base/worker.yaml) run it from a ConfigMap, with
the worker container's environment, so it reads `SLUICE_REDIS_URL` (and the Sentinels', if set)
and `SLUICE_HEARTBEAT_S` as the worker does. A worker's id names its host, which in a pod is the
pod's name: another pod's worker, however fresh, does not keep this one alive.
Heartbeats are scored by Redis's clock, so "now" is Redis's too, never this container's.

`--redis-down-ok` (liveness): exit 0 when Redis does not answer. A restart cannot bring Redis
back, and restarting every worker at once in an outage would only add model loads to it; the
worker's own heartbeat loop reconnects when Redis returns.
"""

from __future__ import annotations

import socket
import sys

import redis

from shared.protocol import WORKERS_KEY, worker_host, worker_ttl_ms
from shared.redis_url import sync_client
from shared.settings import Settings


def main(argv: list[str]) -> int:
    redis_down_ok = "--redis-down-ok" in argv
    settings = Settings()
    client = sync_client(settings, socket_timeout=2, socket_connect_timeout=2)
    try:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        live = client.zrangebyscore(
            WORKERS_KEY, now_ms - worker_ttl_ms(settings.heartbeat_s), "+inf"
        )
    except (redis.RedisError, OSError) as exc:
        print(f"Redis does not answer: {type(exc).__name__}", file=sys.stderr)
        return 0 if redis_down_ok else 1
    host = socket.gethostname()
    if any(worker_host(member.decode()) == host for member in live):
        return 0
    print(f"no fresh heartbeat from a worker on {socket.gethostname()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
