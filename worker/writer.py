"""Appends entries to job streams, batching every job's writes into few Redis round trips.

Order within a stream is kept: one write at a time, entries in call order. Text is sent without
waiting for Redis to store it (`send`), so a fast backend is not held to one token per round
trip; the first and terminal entries wait (`append`). Rich deltas (`send_delta`: tool calls,
logprobs) go the same way, each an entry of its own. Text sent while the stream's previous token
entry is still unwritten joins that entry: a worker that falls behind writes fewer, larger
entries instead of falling further behind, and one that keeps up writes a token per entry. A
failed write is raised by the next call for that stream (as `TextLost`: text the job produced
is not in the stream, so it must not end as if complete).

Every append is fenced (shared/lua/lib/fenced_append.lua): one refused because the attempt was
replaced or the stream already ended raises `Fenced`, and the job stops; a token refused because
the stream was cancelled raises `Cancelled`, and the job ends the stream so.

Redis failing over (issue 24). A write that Redis fails (its connection cut, a master made a
replica, `NOREPLICAS`) is tried again, as it was, for up to `retry_s`, while text that comes
meanwhile waits in the next one: a stream rides through a failover. Trying again is safe because
each entry of a stream begun with `begin` carries the number it should get in its stream: one
that an earlier try stored is not stored twice ('stored'), and one that would follow entries
the new master lacks (a failover lost them: replication is asynchronous) is refused ('lost')
and raises `EntriesLost`, so the job ends the stream with `redis_failover` rather than go on
after a hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import Cancelled
from shared.protocol import (
    ALREADY_STORED,
    REFUSED_CANCELLED,
    REFUSED_FENCED,
    REFUSED_LOST,
    TERMINAL,
    Attempt,
    Delta,
    Entry,
    Token,
    encode,
)
from shared.scripts import lua
from shared.settings import Settings

log = logging.getLogger("sluice.worker")

MIN_WRITE_INTERVAL_S = 0.002
LOADED_WRITE_INTERVAL_S: float = Settings.model_fields["loaded_write_interval_s"].default
LOADED_SENDS_PER_S = 10_000
LOADED_STREAMS = 100
"""A writer that was sent this much text (tokens, deltas) per second, to at least
`LOADED_STREAMS` streams, is loaded: it writes every `loaded_interval_s` instead, so that each
stream's entry carries the several tokens that came meanwhile (one fast stream alone is no
load: its tokens already share entries). At a thousand streams of 30 tokens/s, entries of about
three tokens instead of one took Redis's time per stream from 1.7 to 1.1 ms, and every process's
work per token with it (bench/concurrency.py). Below, every token is its own entry. The load is
judged over up to a loaded interval, whatever the interval between writes: judged between writes
2 ms apart, a thousand streams of 30 tokens/s were some 60 streams, no load, and the writer
became loaded only when a slow write happened to let a hundred streams send."""
MAX_ENTRIES_PER_CALL = 128
"""About 2 ms of Redis's time, the most one append call holds it for."""
MAX_BACKOFF_S = 1.0
MAX_UNSENT = 8192
"""Past this many entries not yet written, `send` waits: memory stays bounded if Redis stalls."""


class Fenced(RuntimeError):
    """The stream no longer takes this attempt's entries: it ended, or a newer attempt owns it."""


class TextLost(RuntimeError):
    """Text sent to a stream was not stored (Redis failed the write): the stream has a gap, so
    it may end only with an error."""


class EntriesLost(TextLost):
    """The stream lacks entries this writer stored: a Redis failover lost them (they had not
    reached the replica that became the master). It may end only with `redis_failover`."""


@dataclass(frozen=True, slots=True)
class _Pending:
    attempt: Attempt
    entry: Entry
    expire_s: int | None
    done: asyncio.Future[str] | None


class StreamWriter:
    def __init__(
        self,
        redis: Redis,
        *,
        retry_s: float = 0.0,
        loaded_interval_s: float = LOADED_WRITE_INTERVAL_S,
        loaded_sends_per_s: int = LOADED_SENDS_PER_S,
        loaded_streams: int = LOADED_STREAMS,
    ) -> None:
        self._append = redis.register_script(lua("append"))
        self._loaded_sends_per_s = loaded_sends_per_s
        self._loaded_streams = loaded_streams
        self._retry_s = retry_s
        """How long a write that Redis fails is tried again."""
        self._numbers: dict[str, int] = {}
        """Stream key -> the number of its last entry, for streams begun with `begin`."""
        self._claims: dict[str, str] = {}
        """Stream key -> the claim of the run of its attempt that writes it (`begin`)."""
        self._unchecked: set[str] = set()
        """Streams whose entries are no longer checked: a failover lost some (`EntriesLost`),
        and only their error entry is still to come, numbered after `_highest`."""
        self._highest: dict[str, int] = {}
        """Stream key -> the highest number this writer gave one of its entries."""
        self._pending: list[_Pending] = []
        self._open_token: dict[str, int] = {}
        """Stream key -> index in `_pending` of its token entry, while nothing follows it."""
        self._flusher: asyncio.Task[None] | None = None
        self._last_write = 0.0
        self._judged_at = 0.0
        """Since when the writer's load is judged (at each write, over what was sent since; it
        starts again a loaded interval on)."""
        self._sends = 0
        self._senders: set[str] = set()
        """Text sent since the load was judged, and the streams it went to: how loaded it is."""
        self._interval = MIN_WRITE_INTERVAL_S
        self._loaded_interval = max(loaded_interval_s, MIN_WRITE_INTERVAL_S)
        self._before_text: set[str] = set()
        """Streams begun (`begin`) that were sent no text yet: their first text is written
        after the short interval even when the writer is loaded (a first token is not held)."""
        self._urgent = asyncio.Event()
        """Set while a stream's first text is among the entries not yet written (its stream in
        `_urgent_streams`): a loaded writer writes those streams' entries, and only those, after
        the short interval, and the others' at its longer one. (Writing everything at each
        first text kept a loaded writer at 2 ms while a thousand streams started, over seconds
        on a busy machine: entries of one or two tokens for all, which cost every process
        more and made the start longer still. A stream's `Started`, which its first token
        waits for, is not urgent: with a thousand streams starting, that kept it at 2 ms too.)"""
        self._urgent_streams: set[str] = set()
        self._last_urgent_write = 0.0
        self._failed: dict[str, BaseException] = {}
        self._drained = asyncio.Event()

    def begin(self, attempt: Attempt, entries: int, claim: str) -> None:
        """The attempt's stream holds `entries` entries when this run of it (`claim`, see
        shared/lua/claim_stream.lua) claims it: every entry this writer appends to it from now
        on is checked to follow them one by one, and to come from this run."""
        self._numbers[attempt.stream_key] = entries
        self._claims[attempt.stream_key] = claim
        self._highest.pop(attempt.stream_key, None)
        self._unchecked.discard(attempt.stream_key)
        self._before_text.add(attempt.stream_key)

    def end(self, attempt: Attempt) -> None:
        """The attempt is done with its stream."""
        self._before_text.discard(attempt.stream_key)
        self._numbers.pop(attempt.stream_key, None)
        self._claims.pop(attempt.stream_key, None)
        self._highest.pop(attempt.stream_key, None)
        self._unchecked.discard(attempt.stream_key)

    def append(
        self, attempt: Attempt, entry: Entry, *, expire_s: int | None = None
    ) -> asyncio.Future[str]:
        """XADD `entry` to the attempt's stream (and set the key's TTL), in order from this call
        on; the future gives the entry's id once it is stored."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(attempt, entry, expire_s, done))
        return done

    async def send(self, attempt: Attempt, text: str) -> None:
        """Append `text` to the attempt's stream soon, in order with its other entries."""
        key = attempt.stream_key
        self._sends += 1
        self._senders.add(key)
        if key in self._before_text:
            self._before_text.discard(key)
            self._urgent_streams.add(key)
            self._urgent.set()
        at = self._open_token.get(key)
        if at is not None:
            self._raise_failure(key)
            unsent = self._pending[at].entry
            assert isinstance(unsent, Token)
            self._pending[at] = _Pending(attempt, Token(unsent.text + text), None, None)
            return
        self._enqueue(_Pending(attempt, Token(text), None, None))
        self._open_token[key] = len(self._pending) - 1
        await self._bounded()

    async def send_delta(self, attempt: Attempt, delta: Delta) -> None:
        """Append `delta` to the attempt's stream soon, in order with its other entries."""
        self._sends += 1
        self._senders.add(attempt.stream_key)
        self._enqueue(_Pending(attempt, delta, None, None))
        await self._bounded()

    async def _bounded(self) -> None:
        if len(self._pending) > MAX_UNSENT:
            self._drained.clear()
            await self._drained.wait()

    async def flushed(self) -> None:
        """Returns once every entry given so far has been written, or has failed to be."""
        while (flusher := self._flusher) is not None:
            await asyncio.wait({flusher})

    def _raise_failure(self, key: str, *, ending: bool = False) -> None:
        """Raises what became of an earlier write to the stream, if it failed. A stream being
        ended (`ending`) may end after a refusal for a cancel: that end is the point of it."""
        if failure := self._failed.pop(key, None):
            if isinstance(failure, Cancelled) and ending:
                return
            if isinstance(failure, Fenced | Cancelled | EntriesLost):
                raise failure
            raise TextLost(f"text for {key} was not stored: {failure!r}") from failure

    def _enqueue(self, item: _Pending) -> None:
        key = item.attempt.stream_key
        self._raise_failure(key, ending=isinstance(item.entry, TERMINAL))
        self._open_token.pop(key, None)
        self._pending.append(item)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if await self._next_write_due(loop):
                    batch = self._take_streams(self._urgent_streams)
                    self._last_urgent_write = loop.time()
                else:
                    now = loop.time()
                    self._interval = (
                        self._loaded_interval if self._loaded(now) else MIN_WRITE_INTERVAL_S
                    )
                    if now - self._judged_at >= self._loaded_interval:
                        self._judged_at, self._sends = now, 0
                        self._senders.clear()
                    self._last_write = now
                    batch, self._pending = self._pending, []
                    self._open_token.clear()
                self._urgent.clear()
                self._urgent_streams.clear()
                self._drained.set()
                # A script call holds Redis while it runs: a large batch goes in parts, so that
                # other clients' calls (a submit, a read) wait for a part, not for the batch.
                for start in range(0, len(batch), MAX_ENTRIES_PER_CALL):
                    part = batch[start : start + MAX_ENTRIES_PER_CALL]
                    try:
                        self._settle(part, await self._write(part))
                    except Exception as exc:  # whatever failed, no caller is left waiting
                        log.warning("could not write %d entries: %s", len(batch) - start, exc)
                        self._settle(batch[start:], [exc] * (len(batch) - start))
                        break
        finally:
            self._flusher = None
            self._drained.set()

    def _settle(self, items: list[_Pending], outcomes: list[str | BaseException]) -> None:
        """Gives each appender what became of its entry (a failure of text sent without waiting
        is raised by the stream's next call)."""
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, str):
                if item.done is not None and not item.done.done():
                    item.done.set_result(outcome)
            elif item.done is None:
                self._failed[item.attempt.stream_key] = outcome
            elif not item.done.done():
                item.done.set_exception(outcome)

    async def _next_write_due(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Waits out the rest of the interval since the last write, so that many jobs' tokens
        share one write instead of one syscall each (an idle writer, a token every few ms, never
        waits), except for a stream's first text (`_urgent`), written once the write on its way
        is back: streams started together have their first tokens a fraction of a millisecond
        apart, and each but the first had waited for most of the interval. A loaded writer's
        longer wait is cut short by a first text too: True then, for a write of the urgent
        streams alone, at most one every short interval."""
        if self._interval > MIN_WRITE_INTERVAL_S:
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._last_write + self._interval):
                        await self._urgent.wait()
            if loop.time() < self._last_write + self._interval:
                due = self._last_urgent_write + MIN_WRITE_INTERVAL_S
                await asyncio.sleep(max(0.0, due - loop.time()))
                return True
        if not self._urgent.is_set():  # at most one write more per stream
            due = self._last_write + MIN_WRITE_INTERVAL_S
            await asyncio.sleep(max(0.0, due - loop.time()))
        return False

    def _take_streams(self, streams: set[str]) -> list[_Pending]:
        """The entries not yet written of `streams`, in order; the others stay, in order."""
        taken: list[_Pending] = []
        kept: list[_Pending] = []
        open_token: dict[str, int] = {}
        for at, item in enumerate(self._pending):
            key = item.attempt.stream_key
            if key in streams:
                taken.append(item)
                continue
            if self._open_token.get(key) == at:
                open_token[key] = len(kept)
            kept.append(item)
        self._pending, self._open_token = kept, open_token
        return taken

    def _loaded(self, now: float) -> bool:
        # Over a loaded interval at least: a round of tokens to many streams at once, a
        # millisecond after the last, is no rate.
        judged_s = max(now - self._judged_at, self._loaded_interval)
        busy = self._sends >= self._loaded_sends_per_s * judged_s
        return busy and len(self._senders) >= self._loaded_streams

    async def _write(self, batch: list[_Pending]) -> list[str | BaseException]:
        keys: list[str] = []
        args: list[str | int] = []
        numbered: dict[str, int] = {}
        expected: list[int | None] = []
        for item in batch:
            key = item.attempt.stream_key
            keys += (key, item.attempt.meta_key)
            args.append(item.attempt.job)
            args.extend(encode(item.entry))
            args.append(item.expire_s or 0)
            if key in self._unchecked:  # after a hole: numbered past every entry it sent
                expected.append(None)
                args += [-self._highest[key], self._claims.get(key, "")]
            elif key in self._numbers:
                numbered[key] = numbered.get(key, self._numbers[key]) + 1
                self._highest[key] = max(self._highest.get(key, 0), numbered[key])
                expected.append(numbered[key])
                args += [numbered[key], self._claims.get(key, "")]
            else:
                expected.append(None)
                args += ["", ""]
        ids = await self._call(keys, args)
        outcomes: list[str | BaseException] = []
        refused: dict[str, int] = {}
        for item, number, entry_id in zip(batch, expected, ids, strict=True):
            key = item.attempt.stream_key
            outcome = _outcome(item, entry_id)
            if isinstance(outcome, Fenced | Cancelled):
                refused[key] = refused.get(key, 0) + 1  # as the script counts them
            elif isinstance(outcome, EntriesLost):
                self._unchecked.add(key)
            elif number is not None and key in self._numbers:
                self._numbers[key] = number - refused.get(key, 0)
            outcomes.append(outcome)
        return outcomes

    async def _call(self, keys: list[str], args: list[str | int]) -> list[bytes]:
        """The append script, tried again while Redis fails, for up to `retry_s`: the same
        entries with the same numbers, so none is stored twice."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_s
        backoff = 0.05
        while True:
            try:
                ids: list[bytes] = await self._append(keys=keys, args=args)
                return ids
            except (RedisError, OSError) as exc:
                if loop.time() + backoff > deadline:
                    raise
                log.warning("writing to Redis failed (%s); trying again in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)


def _outcome(item: _Pending, entry_id: bytes) -> str | BaseException:
    if entry_id == REFUSED_CANCELLED:
        return Cancelled("cancelled by request")
    if entry_id == REFUSED_FENCED:
        return Fenced(f"{item.attempt.job} may no longer append to its stream")
    if entry_id == REFUSED_LOST:
        return EntriesLost(f"Redis lost entries of {item.attempt.stream_key} in a failover")
    if entry_id == ALREADY_STORED:
        return entry_id.decode()  # in the stream all the same: an earlier try stored it
    return entry_id.decode()  # its id
