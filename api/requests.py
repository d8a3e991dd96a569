"""Request bodies → validated requests → the job a worker runs."""

from __future__ import annotations

import json
import uuid
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from shared.errors import InvalidRequest, ModelNotFound
from shared.schema import ChatMessage, GenerationJob, SamplingRequest
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


async def read_json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as OpenAI names a parameter: `messages[0].role`."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part.lower() not in _TYPE_TAGS:
            name += f".{part}" if name else part
    return name


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        raise InvalidRequest(f"{param}: {first['msg']}", param=param or None) from None


def check_model(request: SamplingRequest, settings: Settings) -> None:
    if request.model is not None and request.model != settings.model_name:
        raise ModelNotFound(f"The model `{request.model}` does not exist.", param="model")


def check_text(text: str, param: str, settings: Settings) -> None:
    if not text.strip():
        raise InvalidRequest(f"'{param}' must not be empty", param=param)
    if len(text) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"'{param}' is {len(text)} characters; the limit is {settings.max_prompt_chars}",
            param=param,
        )


def message_dicts(messages: list[ChatMessage], settings: Settings) -> list[dict[str, str]]:
    """Messages as the chat template takes them; `developer` is the newer name for `system`."""
    out = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
        for i, m in enumerate(messages)
    ]
    check_text("".join(m["content"] for m in out), "messages", settings)
    return out


def new_stream_id() -> str:
    return uuid.uuid4().hex


def build_job(
    request: SamplingRequest,
    settings: Settings,
    *,
    max_tokens: int | None,
    min_tokens: int | None = None,
    messages: list[dict[str, str]] | None = None,
    prompt: str | None = None,
) -> GenerationJob:
    check_model(request, settings)
    request.refuse_unsupported()
    return GenerationJob(
        stream_id=new_stream_id(),
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens or request.max_tokens or settings.max_tokens,
        min_tokens=request.min_tokens if min_tokens is None else min_tokens,
        temperature=settings.default_temperature
        if request.temperature is None
        else request.temperature,
        top_p=settings.default_top_p if request.top_p is None else request.top_p,
        stop=request.stop_list,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
    )
