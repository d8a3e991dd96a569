"""POST /v1/chat/completions: the seed's `{"prompt", "stream": true}` or OpenAI's `messages`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.auth import PrincipalDep
from api.deps import GatewayDep
from api.openapi import ERRORS, generated, json_body
from api.requests import build_job, check_text, message_dicts, parse, read_json_object
from shared.errors import InvalidRequest
from shared.schema import ChatCompletion, ChatCompletionRequest, SeedRequest

router = APIRouter(responses=ERRORS)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    openapi_extra=json_body(ChatCompletionRequest, SeedRequest),
    responses=generated(ChatCompletion, "chat.completion.chunk"),
)
async def chat_completions(
    request: Request, gateway: GatewayDep, caller: PrincipalDep
) -> EventSourceResponse | JSONResponse:
    body = await read_json_object(request)
    settings = gateway.settings
    if "prompt" in body and "messages" in body:
        raise InvalidRequest("give either 'prompt' or 'messages', not both", param="prompt")
    if "prompt" in body:
        if body.get("stream") is not True:
            raise InvalidRequest(
                "with 'prompt', 'stream' must be true: this format always streams", param="stream"
            )
        seed = parse(SeedRequest, body)
        check_text(seed.prompt, "prompt", settings)
        model = await gateway.route(seed)
        messages = [
            {"role": "system", "content": settings.seed_system_prompt},
            {"role": "user", "content": seed.prompt},
        ]
        min_tokens = None if "min_tokens" in seed.model_fields_set else settings.seed_min_tokens
        job = build_job(
            seed,
            settings,
            n_ctx=model.n_ctx,
            default_max_tokens=settings.seed_max_tokens,
            min_tokens=min_tokens,
            messages=messages,
        )
        return await gateway.serve(
            request,
            caller,
            job,
            "chat.completion.chunk",
            model=model.name,
            stream=True,
            include_usage=seed.include_usage,
        )
    if "messages" not in body:
        raise InvalidRequest("one of 'messages' or 'prompt' is required", param="messages")
    chat = parse(ChatCompletionRequest, body)
    messages = message_dicts(chat.messages, settings)
    tool_fields = chat.tool_fields()
    model = await gateway.route(chat)
    job = build_job(
        chat,
        settings,
        n_ctx=model.n_ctx,
        default_max_tokens=settings.max_tokens,
        messages=messages,
        tool_fields=tool_fields,
    )
    return await gateway.serve(
        request,
        caller,
        job,
        "chat.completion.chunk",
        model=model.name,
        stream=chat.stream,
        include_usage=chat.include_usage,
    )
