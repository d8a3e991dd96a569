"""The anchor for bench/upstream: the thinnest gateway on sluice's own frameworks. FastAPI and
sse-starlette relay an engine's stream line by line, through one pooled aiohttp session (the
`openai` backend's client), from the request handler: no queue, no Redis, no worker, no
validation. What a Python gateway costs in front of an engine at all, and so what sluice's queue
costs beyond it, is measured against this. Its heap is settled as sluice's processes' are
(`shared.heap`), so their collector's settings are not a difference between them.

Each response carries an id (`X-Sluice-Stream-Id`), and the log says, per id, how long the
engine took to its first token from the request the proxy sent (as sluice's worker logs it).

    python -m bench.proxy --port 8091 --upstream http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse

from shared import heap
from shared.settings import Settings

log = logging.getLogger("bench.proxy")
FIRST_TOKEN_LOG = "engine first token %.1f ms after it was asked [stream %s]"


def create_app(upstream: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            app.state.engine = session
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> EventSourceResponse:
        body = await request.json()
        stream_id = uuid.uuid4().hex

        engine: aiohttp.ClientSession = request.app.state.engine

        async def events() -> AsyncIterator[bytes]:
            asked = time.perf_counter()
            waiting = True
            async with engine.post(f"{upstream}/chat/completions", json=body) as response:
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    if waiting and _has_text(line[6:]):
                        waiting = False
                        log.info(FIRST_TOKEN_LOG, (time.perf_counter() - asked) * 1000, stream_id)
                    yield line.rstrip(b"\r\n") + b"\n\n"

        return EventSourceResponse(
            events(),
            headers={"Cache-Control": "no-cache", "X-Sluice-Stream-Id": stream_id},
            ping=0,
        )

    return app


def _has_text(data: bytes) -> bool:
    """Whether an engine's chunk holds text (its first may hold only the role)."""
    if data.strip() == b"[DONE]":
        return False
    choices = json.loads(data).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content") or choices[0].get("text"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the engine's base URL, with /v1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = create_app(args.upstream)
    heap.settle(Settings().gc_threshold)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
