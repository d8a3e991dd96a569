"""`SLUICE_REDIS_URL`, read the same way by the API and the worker (issue 13).

The API's pool comes from redis-py's `from_url`, which reads the URL with `parse_url`: host,
port, database, a percent-encoded user and password, `rediss://` for TLS and query options such
as `ssl_ca_certs`. arq's worker takes a `RedisSettings` instead, and arq's own `from_dsn` keeps
only host, port, database and the password as typed (still percent-encoded): a worker given the
URL that the API used was refused by Redis, or failed certificate verification, and exited.
Here the worker's settings come from redis-py's own reading of the URL, so both sides connect
alike; an option arq cannot carry is refused at start-up rather than honoured on one side only.

The worker's pool is built here too, not by arq, so that it is bounded (issue 15): arq's pool
opens a connection for every command sent while the others are busy, and a worker starting a
burst of jobs sends a few per job at once (arq's read of the job and its finish, the stream's
claim), so its connections grew with its jobs (46 to 93 for 1000 jobs, bench/worker_connections.py).
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import SSLConnection, parse_url

TLS_OPTIONS = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
)
"""Query options of a `rediss://` URL, named as redis-py and arq both name them."""

_ARQ_FIELDS = {
    "host": "host",
    "port": "port",
    "path": "unix_socket_path",  # unix:///run/redis.sock
    "db": "database",
    "username": "username",
    "password": "password",
    "socket_connect_timeout": "conn_timeout",
    "max_connections": "max_connections",
    "retry_on_timeout": "retry_on_timeout",
    **{name: name for name in TLS_OPTIONS},
}
"""What redis-py reads from a URL -> the `RedisSettings` field that carries it for arq."""
CONNECT_TIMEOUT_S = 1
"""arq's own (`RedisSettings.conn_timeout`), where the URL sets no `socket_connect_timeout`."""
WORKER_CLIENT_NAME = "sluice-worker"
"""How a worker's connections show in Redis's CLIENT LIST: `sluice-worker:<worker id>`."""
QUERY_OPTIONS = (
    "db",
    "socket_connect_timeout",
    "max_connections",
    "retry_on_timeout",
    *TLS_OPTIONS,
)
"""The query options the worker honours as the API does."""


class RedisURLError(ValueError):
    """A `SLUICE_REDIS_URL` the worker cannot use. The message never quotes the URL: it may
    hold a password."""


def parse(url: str) -> tuple[bool, dict[str, Any]]:
    """Whether the URL asks for TLS, and its options as redis-py's `from_url` reads them."""
    try:
        options: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:  # redis-py names the option, never the URL
        raise RedisURLError(f"SLUICE_REDIS_URL: {exc}") from None
    tls = options.pop("connection_class", None) is SSLConnection
    if not tls and (given := [o for o in TLS_OPTIONS if o in options]):
        raise RedisURLError(
            f"SLUICE_REDIS_URL sets {', '.join(given)} without TLS: use a rediss:// URL"
        )
    return tls, options


def arq_redis_settings(url: str) -> RedisSettings:
    """The worker's connection settings, from the same reading of the URL as the API's pool."""
    tls, options = parse(url)
    unsupported = sorted(set(options) - set(_ARQ_FIELDS))
    if unsupported:
        raise RedisURLError(
            f"SLUICE_REDIS_URL option {', '.join(unsupported)} is not supported by the worker; "
            f"it takes {', '.join(QUERY_OPTIONS)}"
        )
    return RedisSettings(ssl=tls, **{_ARQ_FIELDS[name]: v for name, v in options.items()})


def worker_redis(url: str, max_connections: int, worker_id: str) -> ArqRedis:
    """The worker's Redis client (arq's `ctx['redis']`): the URL read as for the API, on a pool
    of at most `max_connections` (fewer if the URL's `max_connections` says so), its Pub/Sub
    subscription's included. A command that finds every connection busy waits for one.

    No wait is given up (`timeout=None`): a command waits only behind other commands, each of
    which ends when Redis answers or its connection fails, so a time limit would only turn a
    burst of jobs into failed jobs. A worker whose Redis hangs stops beating, and the supervisor
    gives its jobs to others. Python 3.11's `asyncio.Condition` loses the wake-up of a waiter
    cancelled as a connection came free; the next command to come (the heartbeat's, every
    `heartbeat_s`) finds the connection free and takes it, and its release wakes the next waiter.
    """
    arq_redis_settings(url)  # what the worker refused, it still refuses
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, **parse_url(url)}
    options["max_connections"] = min(
        options.get("max_connections", max_connections), max_connections
    )
    pool = BlockingConnectionPool(
        timeout=None, client_name=f"{WORKER_CLIENT_NAME}:{worker_id}", **options
    )
    return ArqRedis(connection_pool=pool)
