"""Resume a stream from any API process (`GET /v1/streams/{id}`) and cancel it."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse

from api.auth import PrincipalDep
from api.deps import GatewayDep
from api.metrics import CANCELS
from api.openapi import ERRORS, EVENT_STREAM
from shared.errors import InvalidRequest
from shared.schema import StreamCancelled

router = APIRouter(responses=ERRORS)
ENTRY_ID = re.compile(r"\d+-\d+")


def bare_id(stream_id: str) -> str:
    """Accept the stream id as sent in `X-Sluice-Stream-Id`, or as a chunk's `id`."""
    return stream_id.removeprefix("chatcmpl-").removeprefix("cmpl-")


@router.get(
    "/v1/streams/{stream_id}",
    response_model=None,
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "The stream's chunks after the position, as `POST` streamed them",
            "content": {"text/event-stream": EVENT_STREAM},
        }
    },
)
async def resume_stream(
    stream_id: str,
    gateway: GatewayDep,
    caller: PrincipalDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[str | None, Query()] = None,
) -> EventSourceResponse:
    """Everything after `Last-Event-ID` (or `?after=`), then live entries until `[DONE]`."""
    position = after or last_event_id or "0-0"
    if not ENTRY_ID.fullmatch(position):
        raise InvalidRequest(f"{position!r} is not a stream entry id", param="after")
    return await gateway.resume(bare_id(stream_id), position, caller)


@router.post("/v1/streams/{stream_id}/cancel")
async def cancel_stream(
    stream_id: str, gateway: GatewayDep, caller: PrincipalDep
) -> StreamCancelled:
    stream_id = bare_id(stream_id)
    meta = await gateway.queue.cancel(stream_id, caller)
    CANCELS.labels(meta.model).inc()
    return StreamCancelled(id=stream_id)
