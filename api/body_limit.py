"""Request bodies over `SLUICE_MAX_BODY_BYTES` get 413 before they are read whole (issue 13).

The generation routes read their body whole (`request.body()`): uncapped, the API held a 200 MiB
body in memory to refuse it (and grew by 384 MiB). This ASGI middleware refuses a body whose
`Content-Length` is over the limit without reading any of it, and one that does not declare its
length (chunked) as soon as what has arrived passes the limit. What the client still sends after
that is dropped by uvicorn as it arrives, so memory never grows by the size of what is refused.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from shared.errors import RequestTooLarge


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(f"the request body is over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(self._too_large())(scope, receive, send)
            return

        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised into the route reading the body; the app's error handlers answer
                    # it as any SluiceError. Nothing is read after it.
                    raise self._too_large()
            return message

        await self.app(scope, counted_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length, if any (uvicorn refuses a malformed one; counting applies anyway)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
