"""`EventStream` (api/event_stream.py) replaces sse-starlette's private `_send_with_timeout`:
held here to what the installed sse-starlette does, so that an upgrade that changes it fails
this test first."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import pytest
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message

from api.event_stream import EventStream

MESSAGE: Message = {"type": "http.response.body", "body": b"data: x\n\n", "more_body": True}


async def nothing() -> AsyncIterator[bytes]:
    yield b""


class Gone(Exception):
    """The client's connection, closed under a send."""


async def sent(message: Message) -> None:
    pass


async def refused(message: Message) -> None:
    raise Gone


async def slow(message: Message) -> None:
    await asyncio.sleep(1)


def test_sse_starlettes_send_is_the_private_coroutine_event_stream_replaces() -> None:
    method = EventSourceResponse._send_with_timeout
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters) == ["self", "send", "message"]
    assert EventSourceResponse(nothing())._send_interrupted is False


@pytest.mark.parametrize("response_class", [EventSourceResponse, EventStream])
async def test_a_send_that_fails_marks_the_response_interrupted_and_raises(
    response_class: type[EventSourceResponse],
) -> None:
    response = response_class(nothing())
    await response._send_with_timeout(sent, MESSAGE)
    assert response._send_interrupted is False
    with pytest.raises(Gone):
        await response._send_with_timeout(refused, MESSAGE)
    assert response._send_interrupted is True


@pytest.mark.parametrize("response_class", [EventSourceResponse, EventStream])
async def test_a_send_timeout_still_applies(response_class: type[EventSourceResponse]) -> None:
    response = response_class(nothing(), send_timeout=0.01)
    with pytest.raises(SendTimeoutError):
        await response._send_with_timeout(slow, MESSAGE)
    assert response._send_interrupted is True
