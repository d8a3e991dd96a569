"""The anchor for the pipeline benchmarks: the synthetic backend's tokens, as the same chunks,
streamed by FastAPI + sse-starlette straight from the request handler, with no queue, no
Redis and no worker. What sluice adds is measured against this. It also serves as a scripted
engine that gateways stand in front of (bench/gateways.py): it lists its model, and sends usage
when asked, as an OpenAI-compatible engine does. Its heap is settled as sluice's processes'
are (`shared.heap`): as an engine, a full collection (24 to 45 ms here) stalled every stream
of whichever system's round it fell in, and skewed what that system seemed to add.

    python -m bench.bare --port 8090 [--tokens-per-s 30]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.relay import DONE, event
from shared import heap
from shared.schema import ChunkEncoder, GenerationJob
from shared.settings import Settings
from worker.backends.synthetic import SyntheticBackend
from worker.text import TextAssembler


def create_app(tokens_per_s: float) -> FastAPI:
    app = FastAPI()
    backend = SyntheticBackend(tokens_per_s)

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": "synthetic", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> EventSourceResponse:
        body = await request.json()
        job = GenerationJob(
            stream_id="bare",
            messages=body["messages"],
            max_tokens=body.get("max_tokens") or 1024,
            temperature=0,
            top_p=1,
        )
        chunks = ChunkEncoder(
            "chatcmpl-bare", int(time.time()), "synthetic", "chat.completion.chunk"
        )

        async def events() -> AsyncIterator[ServerSentEvent]:
            generation = await backend.start(job)
            text = TextAssembler([])
            yield event(chunks.role())
            produced = 0
            async for piece in generation.pieces:
                produced += 1
                yield event(chunks.content(text.feed(piece)))
                if produced >= job.max_tokens:
                    break
            yield event(chunks.finish("length" if produced >= job.max_tokens else "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event(chunks.usage(generation.prompt_tokens, produced))
            yield DONE

        return EventSourceResponse(events(), headers={"Cache-Control": "no-cache"}, sep="\n")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    args = parser.parse_args()
    app = create_app(args.tokens_per_s)
    heap.settle(Settings().gc_threshold)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
