"""One blocking XREAD over many streams, packed cheaply, on a connection the reader keeps.

redis-py packs every argument of a command in Python, a couple of microseconds apiece: an XREAD
over a thousand streams cost about 4 ms of CPU per call, more than the rest of the API's work
under load. Here each stream key is packed once, while it is read, and only the ids per call.
Replies come as Redis sends them, `[[key, [[id, [field, value, ...]], ...]], ...]` or None,
not rebuilt into dicts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


def _arg(value: str) -> str:
    """One argument in the Redis protocol (RESP), its length counted in UTF-8 bytes."""
    return f"${len(value.encode())}\r\n{value}\r\n"


def _id_arg(entry_id: str) -> str:
    """A stream entry id (ASCII digits and a dash), as an argument."""
    return f"${len(entry_id)}\r\n{entry_id}\r\n"


class MultiStreamReader:
    def __init__(
        self, pool: ConnectionPool, *, count: int, block_ms: int, timeout_s: float
    ) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._options = "".join(
            map(_arg, ["XREAD", "COUNT", str(count), "BLOCK", str(block_ms), "STREAMS"])
        )
        self._packed_keys: dict[str, str] = {}
        self._connection: AbstractConnection | None = None
        self.reconnections = 0
        """Calls made again on a new connection after the kept one failed."""

    async def read(
        self,
        streams: dict[str, str],
        again: Callable[[], dict[str, str]] | None = None,
    ) -> list[Any] | None:
        """The entries after each stream's id, from the streams that have any, waiting up to
        the block time for one to; None if none did. Made again on a new connection, the call
        asks for what `again` gives then (by default the same streams from the same ids)."""
        kept = self._connection is not None
        try:
            return await self._call(self._command(streams))
        except RedisConnectionError:
            if not kept:
                raise
            # The connection kept from an earlier call was closed while idle (Redis's
            # `timeout`, a proxy, a CLIENT KILL) or cut mid-call: Redis may well be there. Once
            # more, on a new connection; the caller learns of it from `reconnections`.
            self.reconnections += 1
            return await self._call(self._command(streams if again is None else again()))

    def _command(self, streams: dict[str, str]) -> bytes:
        keys = self._packed_keys
        command = "".join(
            [
                f"*{6 + 2 * len(streams)}\r\n",
                self._options,
                *(keys.get(key) or keys.setdefault(key, _arg(key)) for key in streams),
                *map(_id_arg, streams.values()),
            ]
        ).encode()
        if len(keys) > 2 * len(streams) + 64:  # keep the packed keys of streams still read
            self._packed_keys = {key: keys[key] for key in streams}
        return command

    async def last_id(self, key: str) -> str:
        """The id of the stream's last entry ("0-0" if it has none), asked on the connection
        the reads use: after a failover, of the master they read from."""
        command = "".join(["*6\r\n", *map(_arg, ["XREVRANGE", key, "+", "-", "COUNT", "1"])])
        reply = await self._call(command.encode())
        return reply[0][0].decode() if reply else "0-0"

    async def _call(self, command: bytes) -> list[Any] | None:
        connection = self._connection or await self._pool.get_connection()
        self._connection = connection
        try:
            # A Redis that does not answer within the block time and then some (a frozen
            # master) fails the call, as a lost connection does; so does an `UNBLOCKED` error
            # (a master made a replica while the call was blocked).
            async with asyncio.timeout(self._timeout_s):
                await connection.send_packed_command(command)
                reply: list[Any] | None = await connection.read_response()
        except BaseException:
            # Cancelled or failed mid-call, the connection may still owe a reply: drop it.
            self._connection = None
            await connection.disconnect()
            await self._pool.release(connection)
            raise
        return reply

    async def close(self) -> None:
        if self._connection is not None:
            await self._pool.release(self._connection)
            self._connection = None
