"""Redis stream entries → SSE events (or one collected JSON body).

A token: backend → worker → stream entry → `follow` → `sse_events` → the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import anyio
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from api.hub import RawEntry, StreamHub
from shared.errors import (
    GenerationFailed,
    RedisFailover,
    RemoteError,
    ShuttingDown,
    SluiceError,
)
from shared.protocol import (
    TERMINAL,
    Delta,
    Entry,
    Failed,
    Finished,
    Started,
    Token,
    check_complete,
    check_continuous,
    decode,
    entry_id_key,
    entry_number,
    from_fields,
    meta_key,
    stream_key,
)
from shared.schema import ChunkEncoder, CollectedChoice, completion_body, error_envelope
from shared.settings import Settings

log = logging.getLogger("sluice.api")

RELAY_TICK_S = 1.0

# Lines end in "\n" alone: naive clients split on it and compare the data to "[DONE]".
# sse-starlette encodes each ServerSentEvent with the event's own separator ("\r\n" by default).
SEPARATOR = "\n"


class _Event(ServerSentEvent):
    """sse-starlette's event, encoded at once where its data and id are one line each (JSON
    chunks, entry ids: every event the relay sends): its own encoding splits them into lines
    with a regular expression each time, which cost the relay more than the rest of an event."""

    def encode(self) -> bytes:
        data, id = self.data, self.id
        plain = self.comment is None and self.event is None and self.retry is None
        if not plain or not isinstance(data, str) or _lines(data, id):
            return super().encode()
        head = "" if id is None else f"id: {id}{SEPARATOR}"
        return f"{head}data: {data}{SEPARATOR}{SEPARATOR}".encode()


def _lines(data: str, id: str | None) -> bool:
    return "\n" in data or "\r" in data or (id is not None and ("\n" in id or "\r" in id))


def event(data: str, id: str | None = None) -> ServerSentEvent:
    return _Event(data=data, id=id, sep=SEPARATOR)


def comment(text: str) -> ServerSentEvent:
    return ServerSentEvent(comment=text, sep=SEPARATOR)


DONE = event("[DONE]")

Batch = list[tuple[str, Entry]]


@dataclass(frozen=True, slots=True)
class Waiting:
    """Nothing arrived for a while; `queued` says whether the job is still waiting for a worker."""

    queued: bool


async def follow(
    hub: StreamHub,
    settings: Settings,
    stream_id: str,
    after: str = "0-0",
    on_end: Callable[[], None] | None = None,
) -> AsyncIterator[Batch | Waiting]:
    """The stream's entries after `after`, in batches as they arrive, up to the terminal entry
    (`on_end` is called before that one is yielded).

    Only relays: whatever happens to the job (a timeout, a lost worker, an abandoned request),
    the supervisor ends its stream with an entry, which arrives here like any other. While
    nothing arrives it yields `Waiting` about once a second, for keepalives and shutdown.
    """
    key = stream_key(stream_id)
    tick = min(RELAY_TICK_S, settings.ping_s)
    from_start = after == "0-0"
    if not from_start:
        await _check_kept_after(hub, stream_id, after)
    # Entries are numbered (`<ms>-<n>`): each must be the one after the last sent, or a
    # failover lost some (issue 24). A reader that waited across a failover (`hub.epoch`)
    # also checks that its last entry is still there: entries the new master numbers alike
    # may sort before it, and would never come.
    number = entry_number(after)
    epoch = hub.epoch
    last: RawEntry | None = None  # the last entry sent, as Redis gave it
    tokens_sent = not from_start
    started = tokens_sent
    while True:
        if hub.epoch != epoch:
            with contextlib.suppress(RedisError, OSError):  # Redis still away: the hub says
                await _check_still_there(hub, stream_id, after, last)
                epoch = hub.epoch
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancel that arrives as the read
            # completes, and a relay whose client left would go on.
            async with asyncio.timeout(tick):
                raw = await hub.read(key, after, first_text=started and not tokens_sent)
        except TimeoutError:
            yield Waiting(queued=not started)
            continue
        batch = [(entry_id.decode(), decode(kind, value)) for entry_id, (kind, value) in raw]
        if from_start:
            check_complete(batch[0][1])
            from_start = False
        number = check_continuous(number, (entry_id for entry_id, _ in batch))
        after, last = batch[-1][0], raw[-1]
        started = started or any(isinstance(e, Started) for _, e in batch)
        tokens_sent = tokens_sent or any(isinstance(e, Token | Delta) for _, e in batch)
        if isinstance(batch[-1][1], TERMINAL):
            if hub.replicas is not None:  # the end is told once a replica has it
                await hub.replicas.acknowledged()
            if on_end is not None:
                on_end()
            yield batch
            return
        yield batch
        # Behind (entries wait in Redis longer than a read takes), a relay that sent every
        # entry at once would send many small events and fall further behind; it waits instead,
        # and sends what piled up meanwhile as one. One that keeps up sends every token, and one
        # replaying history (a resumed stream: full pages of old entries) does not wait.
        if tokens_sent and len(raw) < hub.count:
            lag = hub.age_s(after)
            if lag > settings.behind_s:
                await asyncio.sleep(min(lag, settings.max_hold_s))


async def _check_kept_after(hub: StreamHub, stream_id: str, after: str) -> None:
    """Raises `StreamTruncated` if entries after `after` may be gone: the stream's head was
    trimmed (it no longer starts as every stream does) past `after`; `RedisFailover` if the
    stream does not hold `after` itself (a failover lost it)."""
    first = await hub.redis.xrange(stream_key(stream_id), count=1)
    if first:
        first_id, fields = first[0]
        if entry_id_key(first_id.decode()) > entry_id_key(after):
            check_complete(from_fields(fields))
            return
    await _check_still_there(hub, stream_id, after)


async def _check_still_there(
    hub: StreamHub, stream_id: str, after: str, sent: RawEntry | None = None
) -> None:
    """Raises `RedisFailover` unless the stream holds the entry `after` (as it was `sent`, if
    known: a new master whose clock is behind may give a new entry a lost one's id) or, before
    its first ("0-0"), unless the stream is known: a request admitted by a master that lost it
    before a replica had it would otherwise be waited for for ever."""
    if after == "0-0":
        if not await hub.redis.exists(meta_key(stream_id)):
            raise RedisFailover(
                "Redis failed over and lost this request before it started; send it again"
            )
        return
    found = await hub.redis.xrange(stream_key(stream_id), min=after, max=after, count=1)
    if not found or (sent is not None and dict(found[0][1]) != _fields(sent)):
        raise RedisFailover(
            f"Redis failed over and this stream no longer holds entry {after}, the last one"
            " this reader had; it cannot go on exactly"
        )


def _fields(raw: RawEntry) -> dict[bytes, bytes]:
    """An entry's fields as redis-py's XRANGE gives them, from an entry as the hub gives it."""
    values = raw[1]
    return dict(zip(values[::2], values[1::2], strict=True))


class EventEncoder:
    """Turns batches of entries into SSE events for one response."""

    def __init__(self, chunks: ChunkEncoder, include_usage: bool) -> None:
        self.chunks = chunks
        self.include_usage = include_usage
        self.role_sent = False

    def events(self, batch: Batch) -> Iterator[ServerSentEvent]:
        """One event per entry, except that consecutive tokens in a batch become one event.

        Tokens pile up only when this process falls behind; coalescing them then sends fewer,
        larger events instead of falling further behind. Each event's id is its last entry's.
        """
        text: list[str] = []
        last_id = ""
        for entry_id, entry in batch:
            if isinstance(entry, Token):
                text.append(entry.text)
                last_id = entry_id
                continue
            if text:
                yield event(self.chunks.content("".join(text)), id=last_id)
                text = []
            match entry:
                case Started(choices=choices):
                    if self.chunks.is_chat and not self.role_sent:
                        self.role_sent = True
                        yield event(self.chunks.role(choices), id=entry_id)
                case Delta():
                    yield event(self.chunks.delta(entry), id=entry_id)
                case Finished(reason, prompt_tokens, completion_tokens, choices):
                    # Several choices' finish reasons went out with their last deltas.
                    if choices == 1:
                        yield event(self.chunks.finish(reason), id=entry_id)
                    if self.include_usage:
                        yield event(self.chunks.usage(prompt_tokens, completion_tokens))
                case Failed(error):
                    yield event(error_envelope(error), id=entry_id)
        if text:
            yield event(self.chunks.content("".join(text)), id=last_id)


class Keepalive:
    """A comment for a stream quiet for `ping_s` (`: queued`, `: generating`), so proxies do
    not cut it."""

    def __init__(self, ping_s: float) -> None:
        self._ping_s = ping_s
        self._last_sent = time.monotonic()

    def sent(self) -> None:
        """Something went out: the stream is not quiet."""
        self._last_sent = time.monotonic()

    def due(self, what: str) -> ServerSentEvent | None:
        """The comment, if the stream has been quiet long enough."""
        now = time.monotonic()
        if now - self._last_sent < self._ping_s:
            return None
        self._last_sent = now
        return comment(what)


async def sse_events(
    entries: AsyncIterator[Batch | Waiting],
    encoder: EventEncoder,
    settings: Settings,
    shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent | bytes]:
    """Every stream ends with `[DONE]`, after an error event if anything went wrong.

    While waiting it sends a comment every `ping_s` (`: queued` or `: generating`), so proxies
    do not cut a quiet stream. When the server shuts down, the stream may go on for most of
    `shutdown_grace_s`, then ends with a `shutting_down` error event, before sse-starlette
    cancels it (and it could no longer say why).
    """
    loop = asyncio.get_running_loop()
    keepalive = Keepalive(settings.ping_s)
    shutdown_deadline: float | None = None
    last = b""  # the stream's last events, which go out with [DONE]
    try:
        async for item in entries:
            now = loop.time()
            if shutdown.is_set():
                shutdown_deadline = shutdown_deadline or now + settings.shutdown_grace_s * 0.8
                if now >= shutdown_deadline:
                    raise ShuttingDown("the server is shutting down; resume this stream elsewhere")
            if isinstance(item, Waiting):
                if ping := keepalive.due("queued" if item.queued else "generating"):
                    yield ping
                continue
            keepalive.sent()
            # A batch's events (the role and the first text, say) go out in one write.
            events = b"".join(ev.encode() for ev in encoder.events(item))
            if isinstance(item[-1][1], TERMINAL):
                last = events
            else:
                yield events
    except SluiceError as exc:
        last = event(error_envelope(exc.body())).encode()
    except Exception:
        log.exception("relay of %s failed", encoder.chunks.id)
        last = event(error_envelope(GenerationFailed("the relay failed").body())).encode()
    yield last + DONE.encode()


async def collect(
    entries: AsyncIterator[Batch | Waiting], chunks: ChunkEncoder
) -> dict[str, object]:
    """The non-streaming response: the whole stream, gathered into one body."""
    choices = [CollectedChoice()]
    async for batch in entries:
        if isinstance(batch, Waiting):
            continue
        for _, entry in batch:
            match entry:
                case Started(choices=n):
                    choices += [CollectedChoice() for _ in range(n - len(choices))]
                case Token(piece):
                    choices[0].text.append(piece)
                case Delta(index=index) if index < len(choices):
                    choices[index].add(entry)
                case Finished(reason, prompt_tokens, completion_tokens):
                    return completion_body(
                        chunks, choices, reason, prompt_tokens, completion_tokens
                    )
                case Failed(error, status):
                    raise RemoteError(error, status)
    raise GenerationFailed("the stream ended without a final entry")
