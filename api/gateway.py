"""What a route hands a validated job to: enqueue it, then stream or collect its entries."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Principal
from api.catalog import ModelCatalog, ServedModel
from api.event_stream import EventStream
from api.hub import StreamHub
from api.jobs import JobQueue
from api.metrics import RESUMES, DeploymentState, RequestClock, arrived, measured
from api.readers import ReaderRegistry
from api.relay import (
    DONE,
    SEPARATOR,
    Batch,
    EventEncoder,
    Waiting,
    collect,
    follow,
    sse_events,
)
from shared import tracing
from shared.errors import ClientDisconnected, SluiceError, StreamNotFound
from shared.logs import bind
from shared.loops import LoopGroup
from shared.protocol import StreamKind, StreamMeta
from shared.schema import ChunkEncoder, GenerationJob, SamplingRequest
from shared.settings import Settings

log = logging.getLogger("sluice.api")
T = TypeVar("T")
STREAM_ID_HEADER = "X-Sluice-Stream-Id"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
ID_PREFIX: dict[StreamKind, str] = {
    "chat.completion.chunk": "chatcmpl-",
    "text_completion": "cmpl-",
}


@dataclass(frozen=True, slots=True)
class Submitted:
    """A queued request: its stream, the headers its response carries, and its clock."""

    stream_id: str
    meta: StreamMeta
    headers: dict[str, str]
    clock: RequestClock


class Gateway:
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        hub: StreamHub,
        readers: ReaderRegistry,
        loops: LoopGroup,
        state: DeploymentState,
        models: ModelCatalog,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.models = models
        self.hub = hub
        self.readers = readers
        self.loops = loops
        """The process's background loops, for health checks."""
        self.state = state

    async def route(self, request: SamplingRequest) -> ServedModel:
        """The model `request` goes to (see `ModelCatalog.route`)."""
        return await self.models.route(request.model)

    def chunk_encoder(self, stream_id: str, meta: StreamMeta) -> ChunkEncoder:
        return ChunkEncoder(
            id=ID_PREFIX[meta.kind] + stream_id,
            created=meta.created,
            model=meta.model,
            object=meta.kind,
        )

    async def submit(
        self,
        request: Request,
        owner: Principal,
        job: GenerationJob,
        kind: StreamKind,
        *,
        model: str,
        include_usage: bool,
        pinned: bool = False,
        keep_s: int | None = None,
    ) -> Submitted:
        """Queue `job` (see `JobQueue.submit`), traced and timed from the request's arrival."""
        key_name = owner.name if self.settings.auth_enabled else None
        bind(job.stream_id, key_name)
        span = tracing.start_span(f"sluice {kind}")
        if span is not None:
            span.set_attribute("sluice.stream_id", job.stream_id)
        job = job.model_copy(update={"key_name": key_name, "trace": tracing.carrier(span)})
        try:
            meta, use = await self.queue.submit(
                job, kind, include_usage, owner, model, pinned=pinned, keep_s=keep_s
            )
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
                span.end()
            raise
        log.info("queued %s", kind)
        headers = {STREAM_ID_HEADER: job.stream_id} | use.headers()
        clock = RequestClock(model, meta.queued_ms, span, received=arrived(request.scope))
        return Submitted(job.stream_id, meta, headers, clock)

    async def serve(
        self,
        request: Request,
        owner: Principal,
        job: GenerationJob,
        kind: StreamKind,
        *,
        model: str,
        stream: bool,
        include_usage: bool,
    ) -> EventSourceResponse | JSONResponse:
        sub = await self.submit(request, owner, job, kind, model=model, include_usage=include_usage)
        stream_id, clock = sub.stream_id, sub.clock
        if stream:
            return self._respond(stream_id, "0-0", sub.meta, sub.headers, clock, announced=True)
        chunks = self.chunk_encoder(stream_id, sub.meta)
        try:
            with self.readers.reading(stream_id, announced=True):
                collecting = collect(self.entries(stream_id, clock), chunks)
                body = await self.until_disconnect(request, owner, stream_id, collecting)
        finally:
            clock.close()
        return JSONResponse(body, headers=sub.headers)

    def entries(
        self, stream_id: str, clock: RequestClock, after: str = "0-0"
    ) -> AsyncIterator[Batch | Waiting]:
        """The stream's entries after `after` (`follow`), observed by the request's clock; its
        end, once relayed, is told to the readers registry (nothing is left to stop)."""
        ended = functools.partial(self.readers.ended, stream_id)
        relayed = follow(self.hub, self.settings, stream_id, after, on_end=ended)
        return measured(relayed, clock, self.hub.age_s)

    async def until_disconnect(
        self, request: Request, owner: Principal, stream_id: str, work: Awaitable[T]
    ) -> T:
        """`work`'s result; if the client hangs up first, the stream's generation is cancelled:
        a response that is not streamed cannot be resumed, so nobody will read the rest."""
        working = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({working, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not working.done():
                working.cancel()
        if working.done() and not working.cancelled():
            return working.result()
        with contextlib.suppress(SluiceError):
            await self.queue.cancel(stream_id, owner)
        raise ClientDisconnected("the client closed the connection before the response")

    async def resume(self, stream_id: str, after: str, reader: Principal) -> EventSourceResponse:
        bind(stream_id, reader.name if self.settings.auth_enabled else None)
        meta = await self.queue.meta(stream_id, reader)
        if not await self.queue.stream_exists(stream_id, meta):
            raise StreamNotFound(f"no stream {stream_id!r} (unknown, or expired)")
        # A client that has seen the end already gets nothing more but [DONE].
        seen_end = await self.queue.ended_by(stream_id, after)
        headers = {STREAM_ID_HEADER: stream_id}
        RESUMES.labels(meta.model).inc()
        clock = RequestClock(meta.model, queued_ms=None)
        return self._respond(stream_id, after, meta, headers, clock, seen_end=seen_end)

    def _respond(
        self,
        stream_id: str,
        after: str,
        meta: StreamMeta,
        headers: dict[str, str],
        clock: RequestClock,
        *,
        seen_end: bool = False,
        announced: bool = False,
    ) -> EventSourceResponse:
        shutdown = anyio.Event()
        encoder = EventEncoder(self.chunk_encoder(stream_id, meta), meta.include_usage)

        async def events() -> AsyncIterator[ServerSentEvent | bytes]:
            if seen_end:
                yield DONE
                return
            try:
                with self.readers.reading(stream_id, announced=announced):
                    entries = self.entries(stream_id, clock, after)
                    async for ev in sse_events(entries, encoder, self.settings, shutdown):
                        yield ev
            finally:
                clock.close()

        return EventStream(
            events(),
            headers=SSE_HEADERS | headers,
            # No ping task of sse-starlette's: the relay sends its own keepalive comments
            # (`: queued`, `: generating`) whenever a stream is quiet for `ping_s`.
            ping=0,
            sep=SEPARATOR,
            shutdown_event=shutdown,
            shutdown_grace_period=self.settings.shutdown_grace_s,
        )


async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
