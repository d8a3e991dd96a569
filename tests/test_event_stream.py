"""`EventStream` (api/event_stream.py) replaces sse-starlette's `__call__` and its private
`_send_with_timeout`: held here to what the installed sse-starlette does, so that an upgrade
that changes it fails this test first."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from sse_starlette import EventSourceResponse, sse
from sse_starlette.sse import (
    AppStatus,
    SendTimeoutError,
    _ensure_watcher_started_on_this_loop,
    _get_shutdown_state,
)
from starlette.background import BackgroundTask
from starlette.types import Message, Receive, Scope, Send

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


# `EventStream.__call__` streams without sse-starlette's task group: each test below holds it
# to what sse-starlette's own `__call__` does, run side by side.
RESPONSES = pytest.mark.parametrize("response_class", [EventSourceResponse, EventStream])
HTTP: Scope = {"type": "http", "method": "POST"}


class Peer:
    """The server's side of one response: the messages it was sent, and a client that can leave."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.left = asyncio.Event()
        self.bodies = asyncio.Queue[bytes]()

    async def receive(self) -> Message:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.bodies.put_nowait(message["body"])

    @property
    def closed(self) -> bool:
        """The closing empty body was sent."""
        return self.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


class Ticks:
    """An endless stream of events, one every 10 ms, that says when its cleanup ran."""

    def __init__(self, farewell_on: anyio.Event | None = None) -> None:
        self.farewell_on = farewell_on
        self.cleaned_up = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            n = 0
            while self.farewell_on is None or not self.farewell_on.is_set():
                yield f"data: {n}\n\n".encode()
                n += 1
                await asyncio.sleep(0.01)
            yield b"data: bye\n\n"
        finally:
            self.cleaned_up = True


@pytest.fixture
def shutting_down() -> Iterator[Callable[[], None]]:
    """Sets sse-starlette's shutdown flag, as uvicorn's signal handler does; reset after."""
    yield lambda: setattr(AppStatus, "should_exit", True)
    AppStatus.should_exit = False


async def only_tasks_left() -> set[asyncio.Task[object]]:
    await asyncio.sleep(0)  # a cancelled task ends at its next turn
    return {t for t in asyncio.all_tasks() if not t.done()} - {asyncio.current_task()}  # type: ignore[misc]


@RESPONSES
async def test_a_finished_stream_is_closed_runs_its_background_and_leaves_no_task(
    response_class: type[EventSourceResponse],
) -> None:
    ran: list[str] = []

    async def three() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"data: {n}\n\n".encode()

    peer = Peer()
    response = response_class(three(), ping=0, background=BackgroundTask(ran.append, "bg"))
    await response(HTTP, peer.receive, peer.send)
    assert [m["type"] for m in peer.sent] == ["http.response.start"] + ["http.response.body"] * 4
    assert peer.closed
    assert ran == ["bg"]
    assert not [t for t in await only_tasks_left() if "watcher" not in repr(t)]


@RESPONSES
async def test_a_client_that_leaves_ends_the_stream_at_once_with_its_cleanup(
    response_class: type[EventSourceResponse],
) -> None:
    peer, ticks = Peer(), Ticks()
    response = response_class(ticks, ping=0)
    serving = asyncio.create_task(response(HTTP, peer.receive, peer.send))
    await peer.bodies.get()
    peer.left.set()
    await asyncio.wait_for(serving, 1)
    assert ticks.cleaned_up
    assert not peer.closed  # nobody to read it


@RESPONSES
async def test_a_cancel_from_outside_goes_on_up(response_class: type[EventSourceResponse]) -> None:
    peer, ticks = Peer(), Ticks()
    serving = asyncio.create_task(response_class(ticks, ping=0)(HTTP, peer.receive, peer.send))
    await peer.bodies.get()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert ticks.cleaned_up


@RESPONSES
async def test_shutdown_tells_the_stream_and_stops_it_after_the_grace(
    response_class: type[EventSourceResponse], shutting_down: Callable[[], None]
) -> None:
    peer, ticks, told = Peer(), Ticks(), anyio.Event()
    response = response_class(ticks, ping=0, shutdown_event=told, shutdown_grace_period=0.3)
    serving = asyncio.create_task(response(HTTP, peer.receive, peer.send))
    await peer.bodies.get()
    shutting_down()
    await asyncio.wait_for(told.wait(), 2)  # sse-starlette's watcher looks every 0.5 s
    told_at = asyncio.get_running_loop().time()
    await asyncio.wait_for(serving, 2)
    assert asyncio.get_running_loop().time() - told_at >= 0.25
    assert ticks.cleaned_up
    assert peer.closed


@RESPONSES
async def test_a_stream_that_says_goodbye_in_the_grace_ends_as_it_chose(
    response_class: type[EventSourceResponse], shutting_down: Callable[[], None]
) -> None:
    peer, told = Peer(), anyio.Event()
    ticks = Ticks(farewell_on=told)
    response = response_class(ticks, ping=0, shutdown_event=told, shutdown_grace_period=5)
    serving = asyncio.create_task(response(HTTP, peer.receive, peer.send))
    await peer.bodies.get()
    shutting_down()
    await asyncio.wait_for(serving, 2)
    assert peer.sent[-2]["body"] == b"data: bye\n\n"
    assert peer.closed


@RESPONSES
async def test_a_stream_that_starts_while_the_server_stops_is_stopped_at_once(
    response_class: type[EventSourceResponse], shutting_down: Callable[[], None]
) -> None:
    shutting_down()
    peer, ticks = Peer(), Ticks()
    await asyncio.wait_for(response_class(ticks, ping=0)(HTTP, peer.receive, peer.send), 1)
    assert ticks.cleaned_up
    assert peer.closed


@RESPONSES
async def test_a_stream_that_starts_while_the_server_stops_still_has_its_grace(
    response_class: type[EventSourceResponse], shutting_down: Callable[[], None]
) -> None:
    shutting_down()
    peer, ticks, told = Peer(), Ticks(), anyio.Event()
    response = response_class(ticks, ping=0, shutdown_event=told, shutdown_grace_period=0.3)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(response(HTTP, peer.receive, peer.send), 2)
    assert told.is_set()
    assert asyncio.get_running_loop().time() - started >= 0.25
    assert peer.closed


@pytest.mark.parametrize(
    ("scope", "options"),
    [({"type": "http", "method": "HEAD"}, {"ping": 0}), (HTTP, {"ping": 15})],
    ids=["HEAD", "pings"],
)
async def test_what_sluice_does_not_stream_itself_goes_to_sse_starlette(
    scope: Scope, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[Scope] = []

    async def own_call(
        self: EventSourceResponse, scope: Scope, receive: Receive, send: Send
    ) -> None:
        called.append(scope)

    monkeypatch.setattr(EventSourceResponse, "__call__", own_call)
    peer = Peer()
    await EventStream(Ticks(), **options)(scope, peer.receive, peer.send)
    assert called == [scope]


def test_sse_starlettes_shutdown_watcher_sets_what_is_registered_in_its_state() -> None:
    """EventStream registers itself where sse-starlette's watcher looks, as an event to set."""
    state = _get_shutdown_state()
    assert isinstance(state.events, set)
    source = inspect.getsource(sse._shutdown_watcher)
    assert "for event in list(state.events):" in source
    assert "event.set()" in source
    assert callable(_ensure_watcher_started_on_this_loop)
    response = EventSourceResponse(nothing())
    for private in ("_response_started", "_response_complete", "_client_disconnected"):
        assert getattr(response, private) is False
    assert response._shutdown_event is None
    assert response._shutdown_grace_period == 0
    assert inspect.iscoroutinefunction(EventSourceResponse._stream_response)
    assert inspect.iscoroutinefunction(EventSourceResponse._listen_for_disconnect)
