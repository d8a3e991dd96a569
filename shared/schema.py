"""The OpenAI wire schema: request models, the job a worker runs, and response encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from shared.errors import ErrorBody, UnsupportedParameter
from shared.protocol import FinishReason, StreamKind


class OpenAIModel(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do; known ones are strict."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: StrictStr


class ContentPart(OpenAIModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: StrictStr


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for n, part in enumerate(self.content):
            if part.type != "text":
                raise UnsupportedParameter(
                    f"content parts of type {part.type!r} are not supported; only 'text'",
                    param=f"messages[{index}].content[{n}].type",
                )
            texts.append(TextPart.model_validate(part.model_dump()).text)
        return "".join(texts)


Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None
Probability = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class StreamOptions(OpenAIModel):
    include_usage: StrictBool = False


class SamplingRequest(OpenAIModel):
    """What every endpoint accepts to steer generation."""

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    temperature: Probability | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream_options: StreamOptions | None = None
    # Accepted only with the value that means "what sluice does anyway".
    n: Annotated[StrictInt, Field(ge=1)] = 1
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    best_of: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    modalities: list[StrictStr] | None = None

    def refuse_unsupported(self) -> None:
        refusals = {
            "n": self.n != 1,
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "logit_bias": bool(self.logit_bias),
            "tools": bool(self.tools),
            "functions": bool(self.functions),
            "response_format": self.response_format is not None
            and self.response_format.get("type", "text") != "text",
            "best_of": self.best_of is not None and self.best_of != 1,
            "echo": self.echo,
            "suffix": bool(self.suffix),
            "modalities": self.modalities is not None and self.modalities != ["text"],
        }
        for param, refused in refusals.items():
            if refused:
                raise UnsupportedParameter(f"sluice does not support '{param}'", param=param)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class SeedRequest(SamplingRequest):
    """The seed's own format: a bare prompt, always streamed."""

    prompt: StrictStr
    stream: Literal[True]


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: StrictBool = False
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


class CompletionRequest(SamplingRequest):
    prompt: StrictStr
    stream: StrictBool = False


class GenerationJob(BaseModel):
    """What the API enqueues and a worker runs. `messages` gets the chat template; `prompt` not."""

    model_config = ConfigDict(frozen=True)

    stream_id: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int
    min_tokens: int = 0
    temperature: float
    top_p: float
    stop: list[str] = []
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


ChunkObject = StreamKind


@dataclass(frozen=True)
class ChunkEncoder:
    """Encodes one stream's chunks. The constant head of every chunk is serialized once."""

    id: str
    created: int
    model: str
    object: ChunkObject
    _base: str = field(init=False, repr=False)
    _head: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        base = json.dumps(
            {"id": self.id, "object": self.object, "created": self.created, "model": self.model},
            separators=(",", ":"),
        )[:-1]
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_head", base + ',"choices":[{"index":0,')

    @property
    def is_chat(self) -> bool:
        return self.object == "chat.completion.chunk"

    def role(self) -> str:
        return self._head + '"delta":{"role":"assistant","content":""},"finish_reason":null}]}'

    def content(self, text: str) -> str:
        quoted = json.dumps(text, ensure_ascii=False)
        if self.is_chat:
            return f'{self._head}"delta":{{"content":{quoted}}},"finish_reason":null}}]}}'
        return f'{self._head}"text":{quoted},"logprobs":null,"finish_reason":null}}]}}'

    def finish(self, reason: FinishReason) -> str:
        if self.is_chat:
            return f'{self._head}"delta":{{"content":""}},"finish_reason":"{reason}"}}]}}'
        return f'{self._head}"text":"","logprobs":null,"finish_reason":"{reason}"}}]}}'

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        counts = json.dumps(usage(prompt_tokens, completion_tokens), separators=(",", ":"))
        return f'{self._base},"choices":[],"usage":{counts}}}'


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    encoder: ChunkEncoder,
    text: str,
    reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """The non-streaming response: the same stream, collected."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if encoder.is_chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": encoder.id,
        "object": "chat.completion" if encoder.is_chat else "text_completion",
        "created": encoder.created,
        "model": encoder.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def error_envelope(error: ErrorBody) -> str:
    return json.dumps({"error": error})
