"""`SLUICE_REDIS_URL`, read the same way by the API and the worker (issue 13).

The API's pool comes from redis-py's `from_url`, which reads the URL with `parse_url`: host,
port, database, a percent-encoded user and password, `rediss://` for TLS and query options such
as `ssl_ca_certs`. arq's worker takes a `RedisSettings` instead, and arq's own `from_dsn` keeps
only host, port, database and the password as typed (still percent-encoded): a worker given the
URL that the API used was refused by Redis, or failed certificate verification, and exited.
Here the worker's settings come from redis-py's own reading of the URL, so both sides connect
alike; an option arq cannot carry is refused at start-up rather than honoured on one side only.
"""

from __future__ import annotations

from typing import Any

from arq.connections import RedisSettings
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
