"""A strict reader of the SSE that sluice sends, for assertions on the raw event stream."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    data: str
    id: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSEResult:
    status: int
    headers: httpx.Headers
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """Every data event but the final [DONE], as JSON."""
        return [e.json for e in self.events if e.data != "[DONE]"]

    @property
    def text(self) -> str:
        out = []
        for chunk in self.chunks:
            for choice in chunk.get("choices", []):
                out.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
        return "".join(out)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [c["error"] for c in self.chunks if "error" in c]


def parse_sse(lines: list[str]) -> tuple[list[Event], list[str]]:
    events: list[Event] = []
    comments: list[str] = []
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if line == "":
            if data:
                events.append(Event("\n".join(data), event_id))
            data, event_id = [], None
        elif line.startswith(":"):
            comments.append(line[1:].strip())
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("id: "):
            event_id = line[4:]
    if data:
        events.append(Event("\n".join(data), event_id))
    return events, comments


async def stream(
    client: httpx.AsyncClient,
    body: dict[str, Any] | None = None,
    path: str = "/v1/chat/completions",
    *,
    headers: dict[str, str] | None = None,
    cut_after: int | None = None,
) -> SSEResult:
    """POST `body` (GET without one) and read the event stream, hanging up after `cut_after`
    data events if given."""
    method = "GET" if body is None else "POST"
    lines: list[str] = []
    seen = 0
    async with client.stream(method, path, json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            if line == "" and len(lines) > 1 and lines[-2].startswith("data: "):
                seen += 1
                if cut_after is not None and seen >= cut_after:
                    break
        events, comments = parse_sse(lines)
        return SSEResult(response.status_code, response.headers, events, comments)
