"""sse-starlette's response, streamed from the request's own task.

`EventSourceResponse.__call__` runs each response in an anyio task group of three tasks (the
stream, a shutdown listener, a disconnect listener), each behind a cancel scope, plus an
`anyio.Event` per response: in bursts of short streams, some 200 us of the API's CPU a request.
`EventStream` streams in the task that called it and keeps one task, the disconnect listener.
The server's shutdown reaches it through sse-starlette's own shared watcher (one per event
loop), which sets whatever is registered in its set of events: here the response itself. What
either ends, it ends as the task group did: the stream is cancelled (after the shutdown grace),
the client that stays gets the closing empty body, the background task runs.

It also sends each event directly where sse-starlette enters an `anyio.move_on_after` cancel
scope per event even with no `send_timeout`, and marks an interrupted send as sse-starlette does.

HEAD, websockets and the options sluice does not use (pings, a data sender, send timeouts) go
to sse-starlette's own `__call__`. These are sse-starlette's private parts, in this one module;
tests/test_event_stream.py holds them to the installed version.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import (
    AppStatus,
    _ensure_watcher_started_on_this_loop,
    _get_shutdown_state,
)
from starlette.types import Message, Receive, Scope, Send


class EventStream(EventSourceResponse):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Held only by the closing send here (there are no pings to contend with): anyio's lock
        # otherwise yields to the event loop on every acquire.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._streaming: asyncio.Task[None] | None = None
        self._stopped = False
        self._grace: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lean = (
            scope["type"] == "http"
            and scope["method"] != "HEAD"
            and self.ping_interval == 0
            and self.data_sender_callable is None
        )
        if not lean:
            await super().__call__(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        listener = asyncio.ensure_future(self._listen_for_disconnect(receive))
        listener.add_done_callback(lambda _: self._stop())
        shutdown = _get_shutdown_state()
        self._streaming = task
        try:
            shutdown.events.add(self)  # type: ignore[arg-type]  # sse-starlette calls .set()
            _ensure_watcher_started_on_this_loop()
            if AppStatus.should_exit:
                self.set()
            await self._stream_response(send)
        except asyncio.CancelledError:
            # Only the cancel this response made ends here; any other goes on up.
            if not self._stopped or task.uncancel() > cancelling:
                raise
        else:
            if self._stopped:  # asked to stop as it ended: the cancel never landed
                task.uncancel()
        finally:
            self._streaming = None
            shutdown.events.discard(self)
            if self._grace is not None:
                self._grace.cancel()
            listener.cancel()
        if listener.done() and not listener.cancelled() and (error := listener.exception()):
            raise error
        await self._close_cut_stream(send)
        if self.background is not None:
            await self.background()

    def set(self) -> None:
        """The server is shutting down (called by sse-starlette's watcher, perhaps after
        `__call__` already did): the stream is told and, after the grace period, stopped."""
        if self._shutdown_event is not None:
            self._shutdown_event.set()
        if self._shutdown_grace_period <= 0:
            self._stop()
        elif self._grace is None:
            self._grace = asyncio.get_running_loop().call_later(
                self._shutdown_grace_period, self._stop
            )

    def _stop(self) -> None:
        """Cancels the stream if it is still going. Called only from the event loop, so the
        streaming task is then suspended inside `_stream_response`, where the cancel lands."""
        if self._streaming is not None and not self._stopped:
            self._stopped = True
            self._streaming.cancel()

    async def _close_cut_stream(self, send: Send) -> None:
        """A stream stopped before its closing empty body still gets one, if its client is
        there to read it (as sse-starlette's `__call__` does after its task group)."""
        if (
            self._response_started
            and not self._response_complete
            and not self._client_disconnected
            and not self._send_interrupted
        ):
            try:
                await self._send_with_timeout(
                    send, {"type": "http.response.body", "body": b"", "more_body": False}
                )
                self._response_complete = True
            except OSError:
                pass  # the peer has gone already (a send timeout is an OSError too)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True
            raise
