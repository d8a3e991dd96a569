"""Redis stream entries → SSE events (or one collected JSON body).

A token: backend → worker → stream entry → `follow` → `sse_events` → the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

from sse_starlette import ServerSentEvent

from api.hub import StreamHub
from api.jobs import JobQueue
from shared.errors import GenerationFailed, QueueTimeout, RemoteError, SluiceError
from shared.protocol import TERMINAL, Entry, Failed, Finished, Started, Token, decode, stream_key
from shared.schema import ChunkEncoder, completion_body, error_envelope
from shared.settings import Settings

log = logging.getLogger("sluice.api")

Batch = list[tuple[str, Entry]]
# Lines end in "\n" alone: naive clients split on it and compare the data to "[DONE]".
# sse-starlette encodes each ServerSentEvent with the event's own separator ("\r\n" by default).
SEPARATOR = "\n"


def event(data: str, id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=data, id=id, sep=SEPARATOR)


def keepalive() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep=SEPARATOR)


DONE = event("[DONE]")


async def follow(
    hub: StreamHub, queue: JobQueue, settings: Settings, stream_id: str, after: str = "0-0"
) -> AsyncIterator[Batch]:
    """The stream's entries after `after`, in batches as they arrive, up to the terminal entry.

    Raises QueueTimeout (after withdrawing the job) if no worker starts it in time.
    """
    key = stream_key(stream_id)
    loop = asyncio.get_running_loop()
    started = after != "0-0"
    deadline = loop.time() + settings.queue_timeout_s
    while True:
        try:
            raw = await asyncio.wait_for(hub.read(key, after), settings.relay_check_s)
        except TimeoutError:
            if not started and loop.time() >= deadline:
                if await queue.withdraw(stream_id):
                    raise QueueTimeout(
                        f"no worker started this request within {settings.queue_timeout_s:g} s"
                    ) from None
                started = True  # a worker claimed it in the meantime
            continue
        batch = [(entry_id, decode(fields)) for entry_id, fields in raw]
        after = batch[-1][0]
        started = True
        yield batch
        if isinstance(batch[-1][1], TERMINAL):
            return


def batch_events(
    batch: Batch, encoder: ChunkEncoder, include_usage: bool
) -> Iterator[ServerSentEvent]:
    """One event per entry, except that consecutive tokens in a batch become one event.

    Tokens pile up only when this process falls behind; coalescing them then sends fewer,
    larger events instead of falling further behind. Each event's id is its last entry's id.
    """
    text: list[str] = []
    last_id = ""
    for entry_id, entry in batch:
        if isinstance(entry, Token):
            text.append(entry.text)
            last_id = entry_id
            continue
        if text:
            yield event(encoder.content("".join(text)), id=last_id)
            text = []
        match entry:
            case Started():
                if encoder.is_chat:
                    yield event(encoder.role(), id=entry_id)
            case Finished(reason, prompt_tokens, completion_tokens):
                yield event(encoder.finish(reason), id=entry_id)
                if include_usage:
                    yield event(encoder.usage(prompt_tokens, completion_tokens))
            case Failed(error):
                yield event(error_envelope(error), id=entry_id)
    if text:
        yield event(encoder.content("".join(text)), id=last_id)


async def sse_events(
    entries: AsyncIterator[Batch], encoder: ChunkEncoder, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """Every stream ends with `[DONE]`, after an error event if anything went wrong."""
    try:
        async for batch in entries:
            for event in batch_events(batch, encoder, include_usage):
                yield event
    except SluiceError as exc:
        yield event(error_envelope(exc.body()))
    except Exception:
        log.exception("relay of %s failed", encoder.id)
        yield event(error_envelope(GenerationFailed("the relay failed").body()))
    yield DONE


async def collect(entries: AsyncIterator[Batch], encoder: ChunkEncoder) -> dict[str, object]:
    """The non-streaming response: the whole stream, gathered into one body."""
    text: list[str] = []
    async for batch in entries:
        for _, entry in batch:
            match entry:
                case Token(piece):
                    text.append(piece)
                case Finished(reason, prompt_tokens, completion_tokens):
                    return completion_body(
                        encoder, "".join(text), reason, prompt_tokens, completion_tokens
                    )
                case Failed(error):
                    raise RemoteError(error)
    raise GenerationFailed("the stream ended without a final entry")
