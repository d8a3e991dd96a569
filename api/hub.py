"""One reader per API process for every open stream.

A blocking XREAD per client would hold one Redis connection per open stream. Instead, clients
register what they wait for (a stream and the last id they have) and one task issues a single
XREAD over all of them. A client is included only while it waits, so a slow client leaves its
backlog in Redis (capped by MAXLEN) rather than in this process.

When Redis fails (a connection lost, a demoted master's `UNBLOCKED`, a frozen one that does
not answer within the block time and `read_timeout_s`), the call is made again, on a new
connection, from each waiter's own id: ids are positions, so nothing is lost or repeated. A
connection closed under the reader is first tried again at once (Redis's `timeout` or a proxy
closes idle ones); only if that fails too is Redis lost. With a single Redis, waiters are then
ended at once (`redis_unavailable`); with Sentinels (`hold_s`) they wait for the new master for
up to `hold_s`, then end (`redis_failover`). Whether a waiter's position is still on the new
master is the relay's to check (`epoch` counts the failures and new connections).

A read asks only for the streams that may have something for their waiters: every append rings
the bells (`BELLS_KEY`, one entry per script call naming the streams it appended to), which
every XREAD includes. A stream once read is known to hold nothing after the id the read ended
at, until a bell names it again; a waiter at that id is not asked for (a thousand streams
waited for, some 7% with new entries per read, cost Redis and this process a thousand keys per
call). Up to `read_all_up_to` streams waited for, every read asks for them all anyway: a token
then takes one call, not a bell's and then its stream's. When Redis fails or the reads go to a
new connection (perhaps a new master), or the hub has not read for half as long as bells are
kept, it forgets what it knew, takes the bells' position anew and asks every stream again; a
read made again on a new connection asks every stream at once, with the bells from then on.

A client that starts waiting while the XREAD is blocked is not in it; unless the call ends by
itself within `WAKE_AFTER_S` (under load one does), the hub then appends to its own small wake
stream, which every XREAD includes, so the call returns and is reissued, unless the client
waits at the id its stream is known to end at (a bell wakes the call then).
The same holds for a client whose stream is in the call but from a later id than the client has
(a client resuming on this process while its old connection still reads): the reply lacks the
entries between the two ids, so that client waits for the next call, which asks from its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.replicas import ReplicaWait
from api.xread import MultiStreamReader
from shared.errors import RedisFailover, RedisUnavailable, StreamReaderFailed
from shared.loops import LoopGroup
from shared.protocol import BELLS_KEEP_MS, BELLS_KEY, entry_id_key, hub_wake_key

log = logging.getLogger("sluice.api")

RawEntry = list[Any]
"""An entry as Redis sends it: [id, [field, value, ...]], bytes throughout."""
MIN_CALL_INTERVAL_S = 0.002
WAKE_AFTER_S = 0.002
"""How long a blocked call that misses a new waiter is given to end by itself before a wake."""
CLOCK_CHECK_S = 60.0
READ_ALL_UP_TO = 16
"""Up to this many streams waited for, each read asks for all of them (see the module's doc)."""
FORGET_AFTER_S = BELLS_KEEP_MS / 1000 / 2
"""A hub that has not read for this long may have missed bells Redis has since trimmed."""
SWEEP_S = 1.0
"""How often what is known of streams no one waits for here is dropped."""


@dataclass(eq=False)
class _Waiter:
    after: str
    done: asyncio.Future[list[RawEntry]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class StreamHub:
    def __init__(
        self,
        redis: Redis,
        *,
        count: int = 256,
        block_ms: int = 5000,
        read_timeout_s: float = 5.0,
        hold_s: float = 0.0,
        replicas: ReplicaWait | None = None,
        read_all_up_to: int = READ_ALL_UP_TO,
    ) -> None:
        self._redis = redis
        self.replicas = replicas
        """With Sentinels: what a relay asks before it tells a stream's end (api/replicas.py)."""
        self.count = count
        """The most entries one read returns for a stream."""
        self._reader = MultiStreamReader(
            redis.connection_pool,
            count=count,
            block_ms=block_ms,
            timeout_s=block_ms / 1000 + read_timeout_s,
        )
        self._hold_s = hold_s
        self._failing_since: float | None = None
        self._failures = 0
        self._wake_key = hub_wake_key(uuid.uuid4().hex)
        self._wake_after = "0-0"
        self._waiters: dict[str, list[_Waiter]] = {}
        self._first_text_waiters = 0
        """Readers waiting for their stream's first text (`read`)."""
        self._in_call: dict[str, str] = {}
        self._blocked = False
        self._calls = 0
        self._wake_sent = False
        self._has_waiters = asyncio.Event()
        self._wake_task: asyncio.Task[None] | None = None
        self._redis_clock_ahead_s = 0.0
        self._read_all_up_to = read_all_up_to
        self._known: dict[str, str] = {}
        """Streams read since the bells last named them: the id after which each held nothing."""
        self._bells_after: str | None = None
        """The last bell read; None: not yet known (at the start, after a failure)."""

    @property
    def redis(self) -> Redis:
        return self._redis

    def start(self, loops: LoopGroup) -> None:
        loops.start("stream-reader", self.read_forever)
        loops.start("redis-clock", self.follow_redis_clock)

    async def close(self) -> None:
        """After its loops have stopped."""
        self._fail_all(RedisUnavailable("the API is shutting down"))
        await self._reader.close()
        if self.replicas is not None:
            await self.replicas.close()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._wake_key)

    def age_s(self, entry_id: str) -> float:
        """How long ago Redis wrote the entry (its id is Redis's clock in milliseconds)."""
        written = int(entry_id.partition("-")[0]) / 1000
        return time.time() + self._redis_clock_ahead_s - written

    async def follow_redis_clock(self) -> None:
        """Keeps `age_s` right when this host's clock and Redis's differ."""
        while True:
            with contextlib.suppress(RedisError, OSError):
                sent = time.time()
                seconds, microseconds = await self._redis.time()
                received = time.time()
                redis_now = seconds + microseconds / 1e6
                self._redis_clock_ahead_s = redis_now - (sent + received) / 2
            await asyncio.sleep(CLOCK_CHECK_S)

    def read(
        self, key: str, after: str, *, first_text: bool = False
    ) -> asyncio.Future[list[RawEntry]]:
        """The entries of `key` after id `after`, once there is at least one. `first_text`: the
        reader waits for its stream's first text, which no call is spaced to wait for.

        A plain future, not a coroutine: `asyncio.wait_for` on it needs no task per read, and
        cancelling it (a timeout, a client gone) withdraws the wait.
        """
        waiter = _Waiter(after)
        if first_text:
            self._first_text_waiters += 1
            waiter.done.add_done_callback(self._first_text_served)
        self._waiters.setdefault(key, []).append(waiter)
        self._has_waiters.set()
        if self._blocked and not self._wake_sent and self._call_misses(key, after):
            self._wake_sent = True
            self._wake_task = asyncio.create_task(self._wake())
        return waiter.done

    def _first_text_served(self, _: asyncio.Future[list[RawEntry]]) -> None:
        self._first_text_waiters -= 1

    def _first_texts_at_once(self) -> bool:
        """Whether the next call goes at once for readers waiting for their first text: only
        with few streams waited for (a call then costs little). Under load some stream always
        waits for its first text, and the calls would never be spaced."""
        return bool(self._first_text_waiters) and len(self._waiters) <= self._read_all_up_to

    def _call_misses(self, key: str, after: str) -> bool:
        """Whether the XREAD now blocked could not serve a waiter for `key` after `after`: its
        stream is not in it (or from a later id), and no bell would end it for that stream."""
        asked = self._in_call.get(key)
        if asked is not None and (asked == after or entry_id_key(after) >= entry_id_key(asked)):
            return False
        return self._known.get(key) != after

    async def _wake(self) -> None:
        """Ends the blocked call, unless it ends by itself first: under load one does within
        milliseconds (entries keep coming), and a wake costs a round trip and a call more."""
        call = self._calls
        await asyncio.sleep(WAKE_AFTER_S)
        if not self._blocked or self._calls != call:
            return
        with contextlib.suppress(RedisError, OSError):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": 1}, maxlen=8, approximate=False)
                pipe.expire(self._wake_key, 60)
                await pipe.execute()

    @property
    def epoch(self) -> int:
        """How many times a read has failed or been made again on a new connection (which may
        be a new master's: a failover cuts the old one): a relay whose reader waited across one
        checks that its position is still in the stream (a failover may have lost it)."""
        return self._failures + self._reader.reconnections

    def _wanted(self) -> dict[str, str]:
        """Each waited-for stream with the smallest id any of its live waiters has."""
        wanted: dict[str, str] = {}
        for key, waiters in list(self._waiters.items()):
            if len(waiters) == 1 and not waiters[0].done.done():  # the usual case, made quick
                wanted[key] = waiters[0].after
                continue
            live = [w for w in waiters if not w.done.done()]
            if live:
                self._waiters[key] = live
                wanted[key] = min((w.after for w in live), key=entry_id_key)
            else:
                del self._waiters[key]
        return wanted

    async def read_forever(self) -> None:
        """The one XREAD loop. Should it fail for a reason other than Redis, its waiters are
        ended too (a relay then ends its stream with an error event the client can resume
        after), and the loop's supervisor restarts it."""
        try:
            await self._read_forever()
        except Exception:
            self._fail_all(StreamReaderFailed("this API process's stream reader failed"))
            raise

    async def _read_forever(self) -> None:
        backoff = 0.05
        loop = asyncio.get_running_loop()
        last_call = last_reply = last_sweep = 0.0
        delivered = True
        while True:
            # Under load, space calls by a couple of milliseconds so each returns many entries;
            # an XREAD costs much the same for one entry as for hundreds. A call that brought no
            # entries (bells only, a wake) is followed at once, and so is one while a reader
            # waits for its first text among few streams (`_first_texts_at_once`): streams
            # started together (a burst of requests) have their first tokens a fraction of a
            # millisecond apart, and all but the first had waited for the interval (0.8 ms more
            # to the median's first token, at 4 streams).
            if delivered and not self._first_texts_at_once():
                await asyncio.sleep(max(0.0, last_call + MIN_CALL_INTERVAL_S - loop.time()))
            last_call = loop.time()
            wanted = self._wanted()
            if not wanted:
                self._has_waiters.clear()
                await self._has_waiters.wait()
                continue
            if last_call - last_sweep > SWEEP_S:
                last_sweep = last_call
                self._known = {k: v for k, v in self._known.items() if k in self._waiters}
            if last_call - last_reply > FORGET_AFTER_S:
                self._bells_after = None
            reconnections = self._reader.reconnections
            try:
                if self._bells_after is None:
                    self._known.clear()
                    self._bells_after = await self._reader.last_id(BELLS_KEY)
                    # Waiters that came during that call found the hub not blocked, so none of
                    # them sent a wake: each must be in this call, or it waits out its block time.
                    wanted = self._wanted()
                reading = self._to_read(wanted)
                self._in_call = reading
                self._wake_sent = False
                self._blocked = True
                self._calls += 1
                try:
                    reply = await self._reader.read(
                        {self._wake_key: self._wake_after, BELLS_KEY: self._bells_after, **reading},
                        again=self._read_again,
                    )
                finally:
                    self._blocked = False
            except (RedisError, OSError) as exc:
                self._failures += 1
                self._bells_after = None
                self._lost_redis(exc, loop.time())
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0 if self._hold_s else 2.0)
                continue
            last_reply = loop.time()
            if self._failing_since is not None:
                log.warning("stream reader has Redis again")
                self._failing_since = None
            backoff = 0.05
            # What the call asked for: `reading`, or what `_read_again` gave a call made again.
            delivered = self._take(self._in_call, reply or [])
            if self._reader.reconnections != reconnections:
                self._bells_after = None  # the bells read may have been another master's

    def _read_again(self) -> dict[str, str]:
        """What a read made again on a new connection asks for: every stream waited for, and
        the bells from now on. The connection may be a new master's, whose bells (the last ones
        lost, its clock behind) can number below the last one read here: asked from there, the
        call would wait out its block time for streams it left out."""
        self._known.clear()
        self._in_call = self._wanted()
        return {self._wake_key: self._wake_after, BELLS_KEY: "$", **self._in_call}

    def _to_read(self, wanted: dict[str, str]) -> dict[str, str]:
        """The streams to ask for: all, when few; else those that may have something for
        their waiters (not known to end at the id they wait at)."""
        if len(wanted) <= self._read_all_up_to:
            return wanted
        known = self._known
        return {key: after for key, after in wanted.items() if known.get(key) != after}

    def _take(self, reading: dict[str, str], reply: list[Any]) -> bool:
        """Hands out a call's reply; whether it held any stream's entries."""
        data = []
        for raw_key, entries in reply:
            key = raw_key.decode()
            if key == self._wake_key:
                self._wake_after = entries[-1][0].decode()
            elif key == BELLS_KEY:
                self._bells_after = entries[-1][0].decode()
                for _, (_, keys) in entries:
                    for rung in keys.decode().split():
                        self._known.pop(rung, None)
            else:
                data.append((key, entries))
        # What was read is known as of this call, bells in its reply (rung before it) or not.
        self._known.update(reading)
        for key, entries in data:
            if len(entries) < self.count:
                self._known[key] = entries[-1][0].decode()
            else:  # a full page: there may be more
                self._known.pop(key, None)
            self._deliver(key, reading[key], entries)
        return bool(data)

    def _lost_redis(self, exc: Exception, now: float) -> None:
        """A read failed: with a single Redis its waiters end; with Sentinels they wait, for
        the new master, up to `hold_s` from the first failure of the streak."""
        if self._failing_since is None:
            log.warning("stream reader lost Redis: %s", exc)
            self._failing_since = now
        if not self._hold_s:
            self._fail_all(RedisUnavailable("lost the connection to Redis"))
        elif now - self._failing_since >= self._hold_s:
            self._fail_all(
                RedisFailover(
                    f"Redis did not come back within {self._hold_s:g} s; resume this stream"
                    " once it has"
                )
            )

    def _deliver(self, key: str, asked: str, entries: list[RawEntry]) -> None:
        """Hand `entries` (those after `asked`) to each waiter, less any it already has.

        A waiter from before `asked` (it came while the call was blocked) gets nothing from
        them: it lacks the entries up to `asked`. It waits, and the next call asks from its id.
        """
        still_waiting = []
        for waiter in self._waiters.get(key, []):
            if waiter.done.done():
                continue
            if waiter.after == asked:
                mine = entries
            else:
                after = entry_id_key(waiter.after)
                if after < entry_id_key(asked):
                    still_waiting.append(waiter)
                    continue
                mine = [e for e in entries if entry_id_key(e[0].decode()) > after]
            if mine:
                waiter.done.set_result(mine)
            else:
                still_waiting.append(waiter)
        if still_waiting:
            self._waiters[key] = still_waiting
        else:
            self._waiters.pop(key, None)

    def _fail_all(self, error: Exception) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done.done():
                    waiter.done.set_exception(error)
        self._waiters.clear()
