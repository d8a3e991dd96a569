"""What a route hands a validated job to: enqueue it, then stream or collect its entries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Principal
from api.catalog import ModelCatalog, ServedModel
from api.hub import StreamHub
from api.jobs import JobQueue
from api.metrics import RESUMES, DeploymentState, RequestClock, arrived, measured
from api.readers import ReaderRegistry
from api.relay import DONE, SEPARATOR, EventEncoder, collect, follow, sse_events
from shared import tracing
from shared.errors import ClientDisconnected, SluiceError, StreamNotFound
from shared.logs import bind
from shared.loops import LoopGroup
from shared.protocol import StreamKind, StreamMeta
from shared.schema import ChunkEncoder, GenerationJob, SamplingRequest
from shared.settings import Settings

log = logging.getLogger("sluice.api")
STREAM_ID_HEADER = "X-Sluice-Stream-Id"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
ID_PREFIX: dict[StreamKind, str] = {
    "chat.completion.chunk": "chatcmpl-",
    "text_completion": "cmpl-",
}


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
        key_name = owner.name if self.settings.auth_enabled else None
        bind(job.stream_id, key_name)
        span = tracing.start_span(f"sluice {kind}")
        if span is not None:
            span.set_attribute("sluice.stream_id", job.stream_id)
        job = job.model_copy(update={"key_name": key_name, "trace": tracing.carrier(span)})
        try:
            meta, use = await self.queue.submit(job, kind, include_usage, owner, model)
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
                span.end()
            raise
        log.info("queued %s", kind)
        chunks = self.chunk_encoder(job.stream_id, meta)
        headers = {STREAM_ID_HEADER: job.stream_id} | use.headers()
        clock = RequestClock(model, meta.queued_ms, span, received=arrived(request.scope))
        if not stream:
            try:
                with self.readers.reading(job.stream_id, announced=True):
                    body = await self._collect_while_connected(
                        request, owner, job.stream_id, chunks, clock
                    )
            finally:
                clock.close()
            return JSONResponse(body, headers=headers)
        return self._respond(job.stream_id, "0-0", meta, headers, clock, announced=True)

    async def _collect_while_connected(
        self,
        request: Request,
        owner: Principal,
        stream_id: str,
        chunks: ChunkEncoder,
        clock: RequestClock,
    ) -> dict[str, object]:
        """The collected body; if the client hangs up first, its generation is cancelled: a
        non-streaming response cannot be resumed, so nobody will ever read the rest."""
        entries = measured(follow(self.hub, self.settings, stream_id), clock, self.hub.age_s)
        collecting = asyncio.ensure_future(collect(entries, chunks))
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collecting.done():
                collecting.cancel()
        if collecting.done() and not collecting.cancelled():
            return collecting.result()
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
                    entries = measured(
                        follow(self.hub, self.settings, stream_id, after), clock, self.hub.age_s
                    )
                    async for ev in sse_events(entries, encoder, self.settings, shutdown):
                        yield ev
            finally:
                clock.close()

        return EventSourceResponse(
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
