"""POST /v1/completions: legacy text completions, the prompt sent to the model as is."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.auth import PrincipalDep
from api.deps import GatewayDep
from api.openapi import ERRORS, generated, json_body
from api.requests import build_job, check_text, parse, read_json_object
from shared.schema import CompletionRequest, TextCompletion

router = APIRouter(responses=ERRORS)

OPENAI_DEFAULT_MAX_TOKENS = 16  # what OpenAI's legacy endpoint uses when max_tokens is omitted


@router.post(
    "/v1/completions",
    response_model=None,
    openapi_extra=json_body(CompletionRequest),
    responses=generated(TextCompletion, "text_completion"),
)
async def completions(
    request: Request, gateway: GatewayDep, caller: PrincipalDep
) -> EventSourceResponse | JSONResponse:
    completion = parse(CompletionRequest, await read_json_object(request))
    check_text(completion.prompt, "prompt", gateway.settings)
    model = await gateway.route(completion)
    job = build_job(
        completion,
        gateway.settings,
        n_ctx=model.n_ctx,
        default_max_tokens=OPENAI_DEFAULT_MAX_TOKENS,
        prompt=completion.prompt,
    )
    return await gateway.serve(
        request,
        caller,
        job,
        "text_completion",
        model=model.name,
        stream=completion.stream,
        include_usage=completion.include_usage,
    )
