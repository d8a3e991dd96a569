"""What a route hands a validated job to: enqueue it, then stream or collect its entries."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.hub import StreamHub
from api.jobs import JobQueue
from api.relay import SEPARATOR, collect, follow, keepalive, sse_events
from shared.schema import ChunkEncoder, ChunkObject, GenerationJob
from shared.settings import Settings

STREAM_ID_HEADER = "X-Sluice-Stream-Id"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
ID_PREFIX: dict[ChunkObject, str] = {
    "chat.completion.chunk": "chatcmpl-",
    "text_completion": "cmpl-",
}


class Gateway:
    def __init__(self, settings: Settings, queue: JobQueue, hub: StreamHub) -> None:
        self.settings = settings
        self.queue = queue
        self.hub = hub

    def encoder(self, stream_id: str, kind: ChunkObject) -> ChunkEncoder:
        return ChunkEncoder(
            id=ID_PREFIX[kind] + stream_id,
            created=int(time.time()),
            model=self.settings.model_name,
            object=kind,
        )

    async def serve(
        self, job: GenerationJob, kind: ChunkObject, *, stream: bool, include_usage: bool
    ) -> EventSourceResponse | JSONResponse:
        await self.queue.submit(job)
        encoder = self.encoder(job.stream_id, kind)
        entries = follow(self.hub, self.queue, self.settings, job.stream_id)
        headers = {STREAM_ID_HEADER: job.stream_id}
        if not stream:
            return JSONResponse(await collect(entries, encoder), headers=headers)
        return EventSourceResponse(
            sse_events(entries, encoder, include_usage),
            headers=SSE_HEADERS | headers,
            ping=self.settings.ping_s,
            ping_message_factory=keepalive,
            sep=SEPARATOR,
        )
