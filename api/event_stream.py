"""sse-starlette's response, less a cancel scope per event.

`EventSourceResponse` sends each event inside `anyio.move_on_after(send_timeout)`, a cancel
scope entered and left per event even with no timeout (about 4 us here, at a thousand streams
some tens of thousands of events a second). With no `send_timeout` this sends directly, and
marks an interrupted send as sse-starlette does (`_send_interrupted`: the response then skips
its closing empty body). These are sse-starlette's private parts, in this one module;
tests/test_event_stream.py holds them to the installed version.
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send


class EventStream(EventSourceResponse):
    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True
            raise
