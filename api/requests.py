"""Request bodies → validated requests → the job a worker runs."""

from __future__ import annotations

import json
import uuid
from typing import Any, NoReturn, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from shared.errors import InvalidRequest
from shared.schema import ChatMessage, GenerationJob, SamplingRequest
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


async def read_json_object(request: Request) -> dict[str, Any]:
    try:
        # Python's parser also takes NaN and Infinity, and recurses once per level of nesting.
        body = json.loads(await request.body(), parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _path(loc: tuple[int | str, ...]) -> list[int | str]:
    """pydantic's error location without the tags it adds for a union's members."""
    return [
        p for p in loc if isinstance(p, int) or (p.isidentifier() and p.lower() not in _TYPE_TAGS)
    ]


def _param(path: list[int | str]) -> str:
    """A location as OpenAI names a parameter: `messages[0].role`."""
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # A union reports an error for each of its members; the member that got deepest into the
        # value is the one the client meant (`content` as a list of parts, not as a string).
        error = max(exc.errors(), key=lambda e: len(_path(e["loc"])))
        param = _param(_path(error["loc"]))
        raise InvalidRequest(f"{param}: {error['msg']}", param=param or None) from None


def check_text(text: str, param: str, settings: Settings) -> None:
    if not text.strip():
        raise InvalidRequest(f"'{param}' must not be empty", param=param)
    if len(text) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"'{param}' is {len(text)} characters; the limit is {settings.max_prompt_chars}",
            param=param,
        )


def check_token_limits(request: SamplingRequest, n_ctx: int | None) -> int | None:
    """The client's cap on generated tokens, if it gave one, once the cap is known to fit.

    The API has no tokenizer: a cap the context of the routed model (`n_ctx`, as its workers
    announce it; None: unknown, not checked) cannot hold whatever the prompt is refused here, as
    vLLM does; the worker cuts any other to the room the prompt leaves.
    """
    limits = request.token_limits()
    for param, limit in limits.items():
        if n_ctx is not None and limit >= n_ctx:
            raise InvalidRequest(
                f"This model's maximum context length is {n_ctx} tokens. However, you "
                f"requested {limit} tokens for the completion ('{param}'), which leaves no room "
                f"for the prompt. Please reduce '{param}'.",
                param=param,
            )
    if not limits:
        return None
    param, limit = list(limits.items())[-1]
    if request.min_tokens > limit:
        raise InvalidRequest(
            f"'min_tokens' ({request.min_tokens}) must not be above '{param}' ({limit})",
            param="min_tokens",
        )
    return limit


def template_message(role: str, content: Any) -> dict[str, Any]:
    """A message as the chat template takes it; `developer` is the newer name for `system`."""
    return {"role": "system" if role == "developer" else role, "content": content}


def message_dicts(messages: list[ChatMessage], settings: Settings) -> list[dict[str, Any]]:
    """The messages as a job carries them: text, or parts that are not all text (for an
    engine; the llama worker refuses them)."""
    out = [template_message(m.role, m.payload) for m in messages]
    text = "".join(m.text for m in messages)
    with_parts = any(isinstance(m["content"], list) for m in out)
    if text.strip() or not with_parts:  # an image may be the whole question
        check_text(text, "messages", settings)
    return out


def new_stream_id() -> str:
    return uuid.uuid4().hex


def build_job(
    request: SamplingRequest,
    settings: Settings,
    *,
    n_ctx: int | None,
    default_max_tokens: int,
    min_tokens: int | None = None,
    messages: list[dict[str, Any]] | None = None,
    prompt: str | None = None,
) -> GenerationJob:
    """The job for `request`: what the client gave, and nothing it did not (sampling it left out
    is the backend's to choose), but for the cap on tokens (`default_max_tokens`) and, when
    given, sluice's own `min_tokens` (the seed format's), never above the cap."""
    request.refuse_unsupported()
    max_tokens = check_token_limits(request, n_ctx) or default_max_tokens
    logprobs, top_logprobs = request.logprob_options()
    given = request.model_fields_set
    return GenerationJob(
        stream_id=new_stream_id(),
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        min_tokens=min(request.min_tokens if min_tokens is None else min_tokens, max_tokens),
        min_tokens_default=min_tokens is not None,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop_list,
        seed=request.seed,
        presence_penalty=request.presence_penalty if "presence_penalty" in given else None,
        frequency_penalty=request.frequency_penalty if "frequency_penalty" in given else None,
        n=request.n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=request.token_biases,
        extra=request.extra,
    )
