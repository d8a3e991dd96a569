"""OpenAI's Responses API: `POST /v1/responses` (in the background or not), retrieve and
resume (`?stream=true&starting_after=N`) from any API process, cancel, delete.

A response is a sluice stream (`resp_<stream id>`); see api/responses.py for its events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Principal, PrincipalDep
from api.event_stream import EventStream
from api.gateway import SSE_HEADERS, STREAM_ID_HEADER
from api.metrics import RESUMES, RequestClock
from api.openapi import ERRORS, EVENT_STREAM, json_body
from api.relay import SEPARATOR, Batch, Keepalive, Waiting
from api.requests import build_job, check_messages, parse, read_json_object
from api.responses import (
    Event,
    ResponseEvents,
    ResponseRecord,
    ResponseStore,
    error_event,
    response_id,
    stream_id_of,
)
from shared.errors import GenerationFailed, InvalidRequest, SluiceError
from shared.schema import ResponsesRequest
from shared.tools import check_tool_replies

RESPONSE_OBJECT = {"schema": {"type": "object", "description": "OpenAI's `Response` object"}}
ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response object; with `stream: true`, its events (`event:` and "
        "`data:` lines, each with a `sequence_number`)",
        "content": {"application/json": RESPONSE_OBJECT, "text/event-stream": EVENT_STREAM},
    }
}

router = APIRouter(responses=ERRORS)
log = logging.getLogger("sluice.api")


async def get_store(request: Request) -> ResponseStore:
    store: ResponseStore | None = getattr(request.app.state, "responses", None)
    if store is None:
        store = request.app.state.responses = ResponseStore(request.app.state.gateway)
    return store


StoreDep = Annotated[ResponseStore, Depends(get_store)]


@router.post(
    "/v1/responses",
    response_model=None,
    openapi_extra=json_body(ResponsesRequest),
    responses=ANSWERS,
)
async def create_response(
    request: Request, store: StoreDep, caller: PrincipalDep
) -> EventSourceResponse | JSONResponse:
    gateway = store.gateway
    settings = gateway.settings
    req = parse(ResponsesRequest, await read_json_object(request))
    if req.background and not req.store:
        raise InvalidRequest("'background' needs 'store': true", param="store")
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = await store.current(req.previous_response_id, caller)
        if previous.status not in ("completed", "incomplete"):
            raise InvalidRequest(
                f"response {req.previous_response_id!r} is {previous.status}; only a finished "
                "response can be continued",
                param="previous_response_id",
            )
        history = [*previous.record.messages, previous.answer()]
    given = req.input_fields()
    check_tool_replies(given, "input", earlier=history)
    conversation = history + given
    check_messages(conversation, "input", settings)
    instructions = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tool_fields = req.tool_fields()
    model = await gateway.route(req)
    job = build_job(
        req,
        settings,
        n_ctx=model.n_ctx,
        default_max_tokens=settings.max_tokens,
        messages=instructions + conversation,
        tool_fields=tool_fields,
    )
    sub = await gateway.submit(
        request,
        caller,
        job,
        "chat.completion.chunk",
        model=model.name,
        include_usage=False,
        pinned=req.background,
        keep_s=store.ttl_s if req.store else None,
    )
    record = ResponseRecord(
        id=response_id(job.stream_id),
        owner=caller.name,
        created_at=sub.meta.created,
        model=model.name,
        background=req.background,
        store=req.store,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=job.temperature,
        top_p=job.top_p,
        metadata=req.metadata,
        previous_response_id=req.previous_response_id,
        messages=conversation,
        tools=[tool.model_dump(exclude_none=True) for tool in req.tools or []],
        tool_choice=req.tool_choice.model_dump()
        if isinstance(req.tool_choice, BaseModel)
        else req.tool_choice or "auto",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        text_format=req.text.format.model_dump(exclude_none=True, by_alias=True)
        if req.text is not None and req.text.format is not None
        else {"type": "text"},
    )
    if req.store:
        await store.save(record)
    if req.stream:
        return _stream(store, record, caller, sub.clock, after=-1, headers=sub.headers)
    state = ResponseEvents(record)
    state.opening()
    try:
        if not req.background:
            with gateway.readers.reading(job.stream_id, announced=True):
                folding = _fold(state, gateway.entries(job.stream_id, sub.clock))
                await gateway.until_disconnect(request, caller, job.stream_id, folding)
    finally:
        sub.clock.close()
    return JSONResponse(state.response(), headers=sub.headers)


async def _fold(state: ResponseEvents, entries: AsyncIterator[Batch | Waiting]) -> None:
    async for batch in entries:
        if not isinstance(batch, Waiting):
            for _, entry in batch:
                state.feed(entry)


@router.get("/v1/responses/{response_id}", response_model=None, responses=ANSWERS)
async def retrieve_response(
    response_id: str,
    store: StoreDep,
    caller: PrincipalDep,
    stream: Annotated[bool, Query()] = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> EventSourceResponse | JSONResponse:
    """The stored response; with `stream=true`, its events after `starting_after`, then live
    ones until its last (a finished, failed or cancelled one replays and closes)."""
    if not stream:
        return JSONResponse((await store.current(response_id, caller)).response())
    record = await store.find(response_id, caller)
    after = -1 if starting_after is None else starting_after
    headers = {STREAM_ID_HEADER: stream_id_of(record.id)}
    RESUMES.labels(record.model).inc()
    clock = RequestClock(record.model, queued_ms=None)
    return _stream(store, record, caller, clock, after=after, headers=headers)


@router.post("/v1/responses/{response_id}/cancel", response_model=None, responses=ANSWERS)
async def cancel_response(response_id: str, store: StoreDep, caller: PrincipalDep) -> JSONResponse:
    """Stops a response's generation; cancelling a finished one answers it as it is."""
    return JSONResponse((await store.cancel(response_id, caller)).response())


@router.delete("/v1/responses/{response_id}", response_model=None, responses=ANSWERS)
async def delete_response(response_id: str, store: StoreDep, caller: PrincipalDep) -> JSONResponse:
    await store.delete(response_id, caller)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def _stream(
    store: ResponseStore,
    record: ResponseRecord,
    caller: Principal,
    clock: RequestClock,
    *,
    after: int,
    headers: dict[str, str],
) -> EventSourceResponse:
    """The events with a `sequence_number` above `after`. A foreground response's readers
    keep it running, as a chat stream's do; a background one runs whoever reads it."""
    gateway = store.gateway
    stream_id = stream_id_of(record.id)

    async def events() -> AsyncIterator[ServerSentEvent]:
        keepalive = Keepalive(gateway.settings.ping_s)
        sequence = after
        try:
            with gateway.readers.reading(stream_id):
                async for event in store.events(record, caller, clock):
                    if not event:
                        if ping := keepalive.due("generating"):
                            yield ping
                        continue
                    if event["sequence_number"] <= after:
                        continue
                    keepalive.sent()
                    sequence = event["sequence_number"]
                    yield _sse(event)
        except SluiceError as exc:
            yield _sse(error_event(sequence, exc.body()))
        except Exception:
            log.exception("relay of response %s failed", record.id)
            error = GenerationFailed("the relay failed")
            yield _sse(error_event(sequence, error.body()))
        finally:
            clock.close()

    return EventStream(events(), headers=SSE_HEADERS | headers, ping=0, sep=SEPARATOR)


def _sse(event: Event) -> ServerSentEvent:
    # An error event carries the number of the event before it: no `id:`, so a browser's
    # Last-Event-ID stays on that event.
    return ServerSentEvent(
        data=json.dumps(event, ensure_ascii=False, separators=(",", ":")),
        event=event["type"],
        id=None if event["type"] == "error" else str(event["sequence_number"]),
        sep=SEPARATOR,
    )
