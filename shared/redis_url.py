"""How the API and the worker reach Redis: one URL (issue 13), or the master that Sentinels name
(issue 24), read the same way by both.

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

**Sentinel** (`SLUICE_REDIS_SENTINELS`, issue 24). The data nodes are the URL's (password,
user, database, TLS and its options), at the address the Sentinels give for the master; the
URL's own host and port are not used. arq's `RedisSettings(sentinel=True, …)` would drop the
bound, the retry and TLS, so the pool is redis-py's `SentinelConnectionPool` made blocking
(`SentinelBlockingPool`): the same bound, TLS on the data nodes, and, as a Sentinel client
must, no connection kept to a master that is no longer the master. redis-py asks the Sentinels
only when it opens a connection, and believes the first that answers; a connection already open
to a master that the Sentinels have replaced (a graceful failover, or a frozen master that
wakes) would go on reading and writing there, where every write is lost when it is made a
replica, and a Sentinel that has not yet heard of a failover names the old master. So:
- every Sentinel is asked, and the answer with the newest `config-epoch` wins (`Sentinels`);
- `watch_master` follows each Sentinel's events: from `+try-failover` (the replica about to be
  promoted stops copying the master moments later) to `+switch-master`, every connection is
  closed and none opened, so nothing is written where it would be lost; and it asks every
  `MASTER_CHECK_S`, closing every connection to an address that is no longer the master's, in
  use or not (a blocked read ends with a connection error at once). Whatever was in flight is
  tried again by its caller, on the new master;
- each command gives up after `SLUICE_REDIS_SOCKET_TIMEOUT_S`, so one sent to a frozen master
  cannot hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis
import redis.sentinel
from arq.connections import ArqRedis, RedisSettings
from redis._parsers import _AsyncHiredisParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.settings import Settings

log = logging.getLogger("sluice.redis")

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
SENTINEL_TIMEOUT_S = 1.0
"""How long a Sentinel may take to connect or answer before the next one is asked."""
MASTER_CHECK_S = 0.5
"""How often a pool asks the Sentinels which node is the master (`watch_master`)."""
FAILOVER_STARTS = ("+try-failover",)
FAILOVER_ENDS = (
    "+switch-master",
    "+failover-end",
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
)
"""Sentinel's Pub/Sub events that begin and end a failover."""
FAILOVER_HOLD_S = 10.0
"""The longest a pool holds off after a failover began, if no Sentinel says it ended."""


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


def _data_node_options(settings: Settings) -> dict[str, Any]:
    """With Sentinels: what the URL says of the data nodes, less where they are."""
    tls, options = parse(settings.redis_url)
    if "path" in options:
        raise RedisURLError("SLUICE_REDIS_URL: a unix:// socket cannot be used with Sentinels")
    options.pop("host", None)
    options.pop("port", None)
    return {"ssl": tls, "socket_timeout": settings.redis_socket_timeout_s, **options}


class Sentinels(Sentinel):
    """redis-py's Sentinel client, that believes the Sentinel with the newest configuration.

    redis-py takes the first Sentinel's answer; right after a failover the Sentinels that did
    not lead it may name the old master for a second or two (they learn of the new one from the
    leader's hello messages), and a client that asked one of them would go back to a node that
    is about to be made a replica. Here every Sentinel is asked, at once, and the answer with
    the highest `config-epoch` (each failover's is higher) wins."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        answers = await asyncio.gather(
            *(sentinel.sentinel_master(service_name) for sentinel in self.sentinels),  # type: ignore[no-untyped-call]
            return_exceptions=True,
        )
        states = [
            state
            for state in answers
            if isinstance(state, dict) and self.check_master_state(state, service_name)
        ]
        if not states:
            errors = [repr(a) for a in answers if isinstance(a, BaseException)]
            raise MasterNotFoundError(f"No master found for {service_name!r}: {errors}")
        newest = max(states, key=lambda state: state["config-epoch"])
        return newest["ip"], int(newest["port"])


def _sentinels(settings: Settings) -> Sentinels:
    password = settings.redis_sentinel_password
    return Sentinels(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={
            "password": password.get_secret_value() if password else None,
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        },
    )


class QuickCheckPool(BlockingConnectionPool):
    """redis-py's blocking pool, whose check of a connection it hands out does not wait, and
    whose connections pack commands at once (`FastPacking`).

    redis-py makes sure a pooled connection owes no reply and was not closed by reading it with
    a timeout of zero: an exception and a turn of the event loop for every command (14 us of
    CPU of a GET's 67 here, and a loop turn's wait on a busy process). The same is known
    without waiting: whatever Redis sent, and its closing, is already in the connection's
    buffers once the loop has read it. Only redis-py's own reader (hiredis) and asyncio's
    buffer are looked at; tests/test_redis_pool.py holds both to it."""

    def __init__(
        self, *, connection_class: type[AbstractConnection] = Connection, **options: Any
    ) -> None:
        super().__init__(connection_class=fast_packing(connection_class), **options)

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await connection.connect()  # type: ignore[no-untyped-call]
        if _owes_nothing(connection):
            return
        await connection.disconnect()
        await connection.connect()  # type: ignore[no-untyped-call]
        if not _owes_nothing(connection):
            raise RedisConnectionError("Connection not ready")


class FastPacking:
    """A connection that packs a command into Redis's protocol in one pass: the same bytes as
    redis-py's `pack_command`, which grows its buffer by a copy per argument. Packing the
    worker's append of 128 entries (1027 arguments) cost 1040 us there and 240 us here; the
    API's submit (51 arguments) 35 and 11 us. Arguments other than str, bytes and int (floats,
    memoryviews, what redis-py refuses) go through redis-py's own encoder, as they would there.
    Mixed into each of redis-py's connection classes (`fast_packing`); tests/test_redis_pool.py
    holds the bytes to redis-py's."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        # A command name of several words ("CONFIG GET") goes as separate arguments.
        if isinstance(command, str):
            args = (*command.encode().split(), *args[1:])
        elif b" " in command:
            args = (*command.split(), *args[1:])
        encoder = self.encoder
        encoding, errors = encoder.encoding, encoder.encoding_errors
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is str:
                value = arg.encode(encoding, errors)
            elif kind is bytes:
                value = arg
            elif kind is int:
                value = b"%d" % arg
            else:
                value = encoder.encode(arg)
            parts.append(b"$%d\r\n%b\r\n" % (len(value), value))
        return [b"".join(parts)]


_fast_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def fast_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class`, packing its commands as `FastPacking` does."""
    if issubclass(connection_class, FastPacking):
        return connection_class
    if connection_class not in _fast_classes:
        name = connection_class.__name__
        _fast_classes[connection_class] = type(name, (FastPacking, connection_class), {})
    return _fast_classes[connection_class]


def _owes_nothing(connection: AbstractConnection) -> bool:
    """Whether the connection is open with nothing unread (redis-py's `can_read_destructive`,
    which this stands for, also discards a reply it finds: the connection is dropped then)."""
    stream: asyncio.StreamReader | None = connection._reader
    parser = connection._parser
    if stream is None or not getattr(parser, "_connected", False):
        return False
    if not isinstance(parser, _AsyncHiredisParser):
        raise TypeError(f"sluice's pools expect hiredis to parse replies, not {parser!r}")
    unparsed = parser._reader is not None and parser._reader.gets() is not NOT_ENOUGH_DATA
    buffered: bytearray = stream._buffer  # type: ignore[attr-defined]
    return not (buffered or stream.at_eof() or unparsed)


class SentinelBlockingPool(SentinelConnectionPool, QuickCheckPool):
    """redis-py's Sentinel pool, bounded as `BlockingConnectionPool` is, that keeps no
    connection to a node once the Sentinels name another master (see the module's doc)."""

    def __init__(self, service_name: str, sentinels: Sentinel, **options: Any) -> None:
        super().__init__(service_name, sentinels, **options)  # type: ignore[no-untyped-call]
        self.master_changes = 0
        """How many times the Sentinels have named another master since this pool began."""
        self._failing_over_until = 0.0

    async def get_master_address(self) -> tuple[str, int]:
        if asyncio.get_running_loop().time() < self._failing_over_until:
            raise MasterNotFoundError(f"a failover of {self.service_name!r} is under way")
        address: tuple[str, int] = await self.sentinel_manager.discover_master(self.service_name)
        if self.master_address is not None and address != self.master_address:
            log.warning("Redis master moved to %s:%s; reconnecting", *address)
            self.master_changes += 1
        self.master_address = address
        await self._drop_stale()
        return address

    async def release(self, connection: AbstractConnection) -> None:
        if self._stale(connection):
            await connection.disconnect()  # it reconnects, to the master, when next used
        await super().release(connection)

    def _stale(self, connection: AbstractConnection) -> bool:
        address = getattr(connection, "host", None), getattr(connection, "port", None)
        return self.master_address is not None and address != tuple(self.master_address)

    async def _drop_stale(self) -> None:
        connections = [*self._available_connections, *self._in_use_connections]
        stale = [c for c in connections if c.is_connected and self._stale(c)]
        await asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True)

    async def watch_master(self) -> None:
        """Follows the Sentinels, for ever: each one's failover events as they are published
        (`_listen`), and which node is the master every `MASTER_CHECK_S`. Connections to a node
        that is no longer the master are closed as soon as the Sentinels say so."""
        listeners = [
            asyncio.create_task(self._listen(sentinel))
            for sentinel in self.sentinel_manager.sentinels
        ]
        try:
            while True:
                with contextlib.suppress(RedisError, OSError):
                    await self.get_master_address()
                await asyncio.sleep(MASTER_CHECK_S)
        finally:
            for listener in listeners:
                listener.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)

    async def _listen(self, sentinel: redis.asyncio.Redis) -> None:
        """A Sentinel's failover events. From `+try-failover` (a Sentinel starts one: the replica
        it promotes stops replicating moments later) to `+switch-master` or an abort, every
        connection is closed and none opened: what would be written to the old master then
        would be lost when it is made a replica. Commands fail at once and are tried again by
        their callers, requests get 503, and the workers' text waits for the new master."""
        while True:
            try:
                async with sentinel.pubsub() as pubsub:
                    await pubsub.subscribe(*FAILOVER_STARTS, *FAILOVER_ENDS)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            await self._failover_event(message["channel"], message["data"])
            except (RedisError, OSError):
                await asyncio.sleep(1.0)

    async def _failover_event(self, channel: bytes, data: bytes) -> None:
        event, words = channel.decode(), data.decode().split()
        name = words[0] if event == "+switch-master" else [*words, ""][1]
        if name != self.service_name:
            return
        loop = asyncio.get_running_loop()
        if event in FAILOVER_STARTS and not self._is_master(words[2:4]):
            return  # a Sentinel that has not heard of the last failover, trying the one before
        if event in FAILOVER_STARTS:
            log.warning("Sentinel: %s of %s; holding writes", event, self.service_name)
            self._failing_over_until = loop.time() + FAILOVER_HOLD_S
            await self.disconnect(inuse_connections=True)
        elif self._failing_over_until:
            log.warning("Sentinel: %s of %s", event, self.service_name)
            self._failing_over_until = 0.0
            with contextlib.suppress(RedisError, OSError):
                await self.get_master_address()

    def _is_master(self, address: list[str]) -> bool:
        """Whether `[ip, port]` is the master this pool uses (or it knows of none yet)."""
        if self.master_address is None:
            return True
        host, port = self.master_address
        return address == [str(host), str(port)]

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


def api_pool(settings: Settings, *, client_name: str) -> ConnectionPool:
    """The API's pool: blocking, and capped, so a burst of requests waits for a connection
    instead of opening one per request (at most `redis_max_connections`)."""
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "timeout": settings.queue_timeout_s,
        "socket_connect_timeout": 2,
        "health_check_interval": 30,
        "client_name": client_name,
    }
    if not settings.redis_sentinels:
        return QuickCheckPool.from_url(settings.redis_url, **options)
    return SentinelBlockingPool(
        settings.redis_sentinel_master,
        _sentinels(settings),
        **{**options, **_data_node_options(settings)},
    )


def worker_redis(
    settings: Settings, worker_id: str, max_connections: int | None = None
) -> ArqRedis:
    """The worker's Redis client (arq's `ctx['redis']`): the URL read as for the API, on a pool
    of at most `max_connections` (`worker_redis_connections`; fewer if the URL's
    `max_connections` says so), its Pub/Sub subscription's included. A command that finds every
    connection busy waits for one.

    No wait is given up (`timeout=None`): a command waits only behind other commands, each of
    which ends when Redis answers or its connection fails, so a time limit would only turn a
    burst of jobs into failed jobs. A worker whose Redis hangs stops beating, and the supervisor
    gives its jobs to others. Python 3.11's `asyncio.Condition` loses the wake-up of a waiter
    cancelled as a connection came free; the next command to come (the heartbeat's, every
    `heartbeat_s`) finds the connection free and takes it, and its release wakes the next waiter.
    """
    url = settings.redis_url
    bound = max_connections or settings.worker_redis_connections
    arq_redis_settings(url)  # what the worker refused, it still refuses
    options: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, **parse_url(url)}
    options["max_connections"] = min(options.get("max_connections", bound), bound)
    common: dict[str, Any] = {"timeout": None, "client_name": f"{WORKER_CLIENT_NAME}:{worker_id}"}
    if not settings.redis_sentinels:
        return ArqRedis(connection_pool=QuickCheckPool(**common, **options))
    pool = SentinelBlockingPool(
        settings.redis_sentinel_master,
        _sentinels(settings),
        **common,
        **{
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            **_data_node_options(settings),
            "max_connections": options["max_connections"],
        },
    )
    return ArqRedis(connection_pool=pool)


def master_watch(redis_client: redis.asyncio.Redis) -> SentinelBlockingPool | None:
    """The client's Sentinel pool, whose `watch_master` should run while the client is used;
    None for a single Redis."""
    pool = redis_client.connection_pool
    return pool if isinstance(pool, SentinelBlockingPool) else None


def sync_client(settings: Settings, **options: Any) -> redis.Redis:
    """A blocking client for commands and probes (`sluice keys`, `sluice status`, the workers'
    health checks), to the one Redis or to the master the Sentinels name."""
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    password = settings.redis_sentinel_password
    sentinels = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={
            "password": password.get_secret_value() if password else None,
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        },
    )
    tls, data = parse(settings.redis_url)
    data.pop("host", None)
    data.pop("port", None)
    master: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, ssl=tls, **{**data, **options}
    )
    return master
