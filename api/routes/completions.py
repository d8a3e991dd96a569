"""POST /v1/completions: legacy text completions, the prompt sent to the model as is."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import GatewayDep
from api.requests import build_job, check_text, parse, read_json_object
from shared.schema import CompletionRequest

router = APIRouter()

OPENAI_DEFAULT_MAX_TOKENS = 16  # what OpenAI's legacy endpoint uses when max_tokens is omitted


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, gateway: GatewayDep) -> EventSourceResponse | JSONResponse:
    completion = parse(CompletionRequest, await read_json_object(request))
    check_text(completion.prompt, "prompt", gateway.settings)
    job = build_job(
        completion,
        gateway.settings,
        max_tokens=completion.max_tokens or OPENAI_DEFAULT_MAX_TOKENS,
        prompt=completion.prompt,
    )
    return await gateway.serve(
        job, "text_completion", stream=completion.stream, include_usage=completion.include_usage
    )
