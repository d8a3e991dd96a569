"""The OpenAI wire schema: request models, the job a worker runs, and response encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from shared.errors import ErrorBody, InvalidRequest, UnsupportedParameter
from shared.protocol import Delta, FinishReason, StreamKind


def _encodable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "lone_surrogate", "must be valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)"
        ) from None
    return text


# Caps on the shape of a request (issue 13). A body is at most SLUICE_MAX_BODY_BYTES, but 1 MiB
# of tiny messages is ~60,000 of them, each a chat-template turn for the worker to render and
# tokenize, and a long stop string is matched against the output at every token and holds back
# that much text from the stream. These are protocol limits, not deployment tunables, so they are
# constants and the OpenAPI document shows them: OpenAI's API takes at most 2048 messages and
# documents up to 4 stop sequences; no real stop sequence is longer than a line.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 64
"""Content parts per message (only `text` parts are served)."""
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_CHOICES = 8
"""`n`: a job's choices each take a sequence of the worker's batch."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's and vLLM's cap on `top_logprobs` (and on the legacy `logprobs`)."""
MAX_LOGIT_BIAS = 100.0


def _at_most(limit: int, what: str) -> AfterValidator:
    """A cap on a list that is one member of a union (a string or a list of them), checked on
    the union's result: inside the member, a too-long list would be reported together with the
    other member's complaint ("should be a valid string"), and the client told the wrong one."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise PydanticCustomError(
                "too_long",
                "at most {limit} {what}, not {count}",
                {"limit": limit, "what": what, "count": len(value)},
            )
        return value

    return AfterValidator(check)


def _max_items(limit: int) -> Any:
    """The cap `_at_most` enforces, shown in the OpenAPI document."""
    return Field(json_schema_extra={"maxItems": limit})


# Every string the API reads. JSON's "\ud800" escape decodes to a lone surrogate, which has no
# UTF-8 encoding (for the tokenizer, Redis or a response): refused here, it is a 400 naming the
# parameter instead of a 500 wherever it would first be encoded.
Text = Annotated[StrictStr, AfterValidator(_encodable)]


class OpenAIModel(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do; known ones are strict."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(OpenAIModel):
    """One part of a message's content. Any type validates: `text` is read here, the others
    (`image_url`, `input_audio`, …) go to engines as they came, and the llama worker refuses
    them by name."""

    model_config = ConfigDict(extra="allow", strict=True)
    # The examples also lead tests/test_fuzz.py to the one type with rules of its own.
    type: Annotated[Text, Field(examples=["text", "image_url"])]
    text: Text | None = Field(None, validate_default=True)

    @field_validator("text")
    @classmethod
    def _text_part_has_text(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is None and info.data.get("type") == "text":
            raise PydanticCustomError("missing", "a content part of type 'text' needs 'text'")
        return text


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        Text | Annotated[list[ContentPart], _max_items(MAX_CONTENT_PARTS)] | None,
        _at_most(MAX_CONTENT_PARTS, "content parts"),
    ] = None
    name: Text | None = None

    @property
    def text(self) -> str:
        """The text of its content (of its text parts)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    @property
    def payload(self) -> str | list[dict[str, Any]]:
        """Its content as a job carries it: the text, or, with a part that is not text (an
        image, audio), every part as the client sent it."""
        if isinstance(self.content, list) and any(p.type != "text" for p in self.content):
            return [part.model_dump(exclude_unset=True) for part in self.content]
        return self.text


StopString = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
Stop = Annotated[
    StopString | Annotated[list[StopString], _max_items(MAX_STOPS)] | None,
    _at_most(MAX_STOPS, "stop strings"),
]
Probability = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class StreamOptions(OpenAIModel):
    include_usage: StrictBool = False


def _check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    for token in bias or {}:
        if not token.isdigit():  # JSON keys are strings: each a token id
            raise PydanticCustomError(
                "token_id",
                "keys must be token ids (integers from 0), not {token!r}",
                {"token": token},
            )
    return bias


def _encodable_json(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except (UnicodeEncodeError, TypeError, ValueError):
        return False
    return True


LogitBias = Annotated[
    dict[Text, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None,
    AfterValidator(_check_logit_bias),
]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class SamplingRequest(OpenAIModel):
    """What every endpoint accepts to steer generation. Fields it does not know are kept
    (`model_extra`), for engines: an `openai` worker sends them on as they came."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Text | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    temperature: Probability | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Stop = None
    # A signed or an unsigned 64-bit integer: OpenAI documents the one, llama.cpp and vLLM take
    # the other, and clients send both.
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None
    logit_bias: LogitBias = None
    # Accepted only with the value that means "what sluice does anyway".
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    best_of: StrictInt | None = None
    echo: StrictBool = False
    suffix: Text | None = None
    modalities: list[Text] | None = None

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if not _encodable_json(value):
                raise InvalidRequest(f"'{name}' must be valid Unicode JSON", param=name)
        refusals = {
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

    def logprob_options(self) -> tuple[bool, int]:
        """Whether each token's logprob is asked for, and how many alternatives with it."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return bool(self.logprobs), self.top_logprobs or 0

    @property
    def token_biases(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}

    @property
    def extra(self) -> dict[str, Any]:
        """The fields sluice does not interpret, as the client sent them."""
        return dict(self.model_extra or {})

    def token_limits(self) -> dict[str, int]:
        """The caps on generated tokens that the client gave, by parameter; the last one applies."""
        return {} if self.max_tokens is None else {"max_tokens": self.max_tokens}

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

    prompt: Text
    stream: Literal[True]


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    stream: StrictBool = False
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None

    def token_limits(self) -> dict[str, int]:
        # OpenAI's newer name for `max_tokens`: it wins when both are given.
        limits = super().token_limits()
        if self.max_completion_tokens is not None:
            limits["max_completion_tokens"] = self.max_completion_tokens
        return limits


class CompletionRequest(SamplingRequest):
    prompt: Text
    stream: StrictBool = False
    logprobs: TopLogprobs | None = None  # type: ignore[assignment]
    """The legacy form: how many alternatives to give with each token's logprob."""

    def logprob_options(self) -> tuple[bool, int]:
        if self.top_logprobs is not None:
            raise InvalidRequest(
                "'top_logprobs' is the chat form: give '/v1/completions' 'logprobs' as a number",
                param="top_logprobs",
            )
        return self.logprobs is not None, self.logprobs or 0


class GenerationJob(BaseModel):
    """What the API enqueues and a worker runs. `messages` gets the chat template; `prompt` not."""

    model_config = ConfigDict(frozen=True)

    stream_id: str
    key_name: str | None = None
    """The API key's name when authentication is on, for the worker's log lines."""
    trace: dict[str, str] | None = None
    """The request's trace context (W3C `traceparent`), when tracing is on."""
    messages: list[dict[str, Any]] | None = None
    """`role` and `content`: the text, or a list of parts where one is not text (see
    `ChatMessage.payload`)."""
    prompt: str | None = None
    max_tokens: int
    """Per choice."""
    min_tokens: int = 0
    min_tokens_default: bool = False
    """`min_tokens` is sluice's own (the seed format's), not the client's: an engine that refuses
    the parameter is asked again without it."""
    # None: the client did not say, and the backend's model decides (the llama backend's
    # defaults are SLUICE_DEFAULT_TEMPERATURE and SLUICE_DEFAULT_TOP_P; an engine's are its own).
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = []
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    """Alternatives per token, with `logprobs`."""
    logit_bias: dict[int, float] = {}
    extra: dict[str, Any] = {}
    """Every request field sluice does not interpret, as the client sent it: for engines."""


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

    def role(self, choices: int = 1) -> str:
        if choices == 1:
            return self._head + '"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
        roles = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(choices)
        ]
        return self._with_choices(roles)

    def delta(self, delta: Delta) -> str:
        """A rich delta: its choice's index, text, logprobs, tool calls, finish reason."""
        lp = delta.logprobs
        choice: dict[str, Any] = {"index": delta.index}
        if self.is_chat:
            content: dict[str, Any] = {"content": delta.text}
            if delta.tool_calls:
                content = {"tool_calls": delta.tool_calls} | (
                    {"content": delta.text} if delta.text else {}
                )
            choice["delta"] = content
            choice["logprobs"] = {"content": lp} if lp else None
        else:
            choice["text"] = delta.text
            choice["logprobs"] = legacy_logprobs(lp, delta.offset or 0) if lp else None
        choice["finish_reason"] = delta.finish_reason
        return self._with_choices([choice])

    def _with_choices(self, choices: list[dict[str, Any]]) -> str:
        quoted = json.dumps(choices, ensure_ascii=False, separators=(",", ":"))
        return f'{self._base},"choices":{quoted}}}'

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
        counts = Usage.of(prompt_tokens, completion_tokens).model_dump_json()
        return f'{self._base},"choices":[],"usage":{counts}}}'


def legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, list[Any]]:
    """Chat `logprobs.content` entries in `/v1/completions`' shape: `tokens`, `token_logprobs`,
    `top_logprobs` (each token's alternatives and itself, by token) and `text_offset` (where
    each token starts in the answer; the first at `offset`)."""
    legacy: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    at = offset
    for entry in entries:
        legacy["tokens"].append(entry["token"])
        legacy["token_logprobs"].append(entry["logprob"])
        top = {alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs") or ()}
        legacy["top_logprobs"].append(top | {entry["token"]: entry["logprob"]})
        legacy["text_offset"].append(at)
        at += len(entry["token"])
    return legacy


@dataclass
class CollectedChoice:
    """One choice of a non-streaming answer, gathered from its stream's entries."""

    text: list[str] = field(default_factory=list)
    logprobs: list[tuple[list[dict[str, Any]], int]] = field(default_factory=list)
    """Per delta with logprobs: its entries and its text's offset."""
    reason: FinishReason | None = None

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        if delta.logprobs:
            self.logprobs.append((delta.logprobs, delta.offset or 0))
        self.reason = delta.finish_reason or self.reason

    def logprobs_body(self, chat: bool) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if chat:
            return {"content": [entry for entries, _ in self.logprobs for entry in entries]}
        legacy: dict[str, list[Any]] = {}
        for entries, offset in self.logprobs:
            for key, values in legacy_logprobs(entries, offset).items():
                legacy.setdefault(key, []).extend(values)
        return legacy


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class Choice(BaseModel):
    index: int = 0
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Choice):
    message: AssistantMessage


class TextChoice(Choice):
    text: str


ObjectT = TypeVar("ObjectT", bound=str)
ChoiceT = TypeVar("ChoiceT", bound=Choice)


class Completion(BaseModel, Generic[ObjectT, ChoiceT]):
    """The non-streaming response: the same stream, collected."""

    id: str
    object: ObjectT
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage


class ChatCompletion(Completion[Literal["chat.completion"], ChatChoice]):
    """A non-streaming answer of `/v1/chat/completions`."""


class TextCompletion(Completion[Literal["text_completion"], TextChoice]):
    """A non-streaming answer of `/v1/completions`."""


def completion_body(
    encoder: ChunkEncoder,
    choices: list[CollectedChoice],
    reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """The non-streaming body: each choice's text and logprobs, and its finish reason (`reason`
    where its deltas gave none: a single choice's comes with the stream's end)."""
    head = {"id": encoder.id, "created": encoder.created, "model": encoder.model}
    usage = Usage.of(prompt_tokens, completion_tokens)
    chat = encoder.is_chat
    if chat:
        return ChatCompletion(
            **head,
            object="chat.completion",
            choices=[
                ChatChoice(
                    index=i,
                    finish_reason=c.reason or reason,
                    logprobs=c.logprobs_body(chat),
                    message=AssistantMessage(content="".join(c.text)),
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        ).model_dump()
    return TextCompletion(
        **head,
        object="text_completion",
        choices=[
            TextChoice(
                index=i,
                finish_reason=c.reason or reason,
                logprobs=c.logprobs_body(chat),
                text="".join(c.text),
            )
            for i, c in enumerate(choices)
        ],
        usage=usage,
    ).model_dump()


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body, and a failed stream's last event before `[DONE]`."""

    error: ErrorBody


def error_envelope(error: ErrorBody) -> str:
    return json.dumps({"error": error})


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StreamCancelled(BaseModel):
    id: str
    object: Literal["stream"] = "stream"
    status: Literal["cancelled"] = "cancelled"


# --- OpenAI's Responses API (issue 17) ---

MAX_INPUT_ITEMS = MAX_MESSAGES
INCLUDE_LOGPROBS = "message.output_text.logprobs"
"""The one `include` served: each output token's logprobs, with `top_logprobs` alternatives."""


class ResponseInputPart(OpenAIModel):
    """A part of an input message's content: `input_text` (or `output_text`, as an earlier
    answer is echoed back); any other type validates and is refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class ResponseInputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        Text | Annotated[list[ResponseInputPart], _max_items(MAX_CONTENT_PARTS)],
        _at_most(MAX_CONTENT_PARTS, "content parts"),
    ]

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        texts = []
        for n, part in enumerate(self.content):
            if part.type not in ("input_text", "output_text"):
                raise UnsupportedParameter(
                    f"input parts of type {part.type!r} are not supported; only 'input_text'",
                    param=f"input[{index}].content[{n}].type",
                )
            texts.append(part.text or "")
        return "".join(texts)


class ResponsesRequest(SamplingRequest):
    """`POST /v1/responses`: a text answer to `input`, optionally in the background."""

    input: (
        Text
        | Annotated[list[ResponseInputMessage], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    )
    instructions: Text | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    metadata: Annotated[
        dict[str, Annotated[Text, Field(max_length=512)]], Field(max_length=16)
    ] = {}
    store: StrictBool = True
    stream: StrictBool = False
    background: StrictBool = False
    previous_response_id: Text | None = None
    # Accepted only with the value that means "a plain text answer".
    reasoning: dict[str, Any] | None = None
    include: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    truncation: Text | None = None
    prompt: dict[str, Any] | None = None
    conversation: Any = None
    max_tool_calls: StrictInt | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        text_format = (self.text or {}).get("format") or {"type": "text"}
        refusals = {
            # Chat's forms, not the Responses API's: it has one output, and logprobs come
            # with `top_logprobs` and `include`.
            "n": self.n != 1,
            "logprobs": self.logprobs is not None,
            "reasoning": bool(self.reasoning),
            "include": any(item != INCLUDE_LOGPROBS for item in self.include or ()),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "text": not isinstance(text_format, dict) or text_format.get("type") != "text",
            "truncation": self.truncation not in (None, "disabled"),
            "prompt": self.prompt is not None,
            "conversation": self.conversation is not None,
            "max_tool_calls": self.max_tool_calls is not None,
        }
        refused = [param for param, no in refusals.items() if no]
        if refused:
            names = ", ".join(f"'{p}'" for p in refused)
            raise UnsupportedParameter(f"sluice does not support {names}", param=refused[0])

    def logprob_options(self) -> tuple[bool, int]:
        return INCLUDE_LOGPROBS in (self.include or ()), self.top_logprobs or 0

    def token_limits(self) -> dict[str, int]:
        limits = super().token_limits()
        if self.max_output_tokens is not None:
            limits["max_output_tokens"] = self.max_output_tokens
        return limits

    def input_messages(self) -> list[ResponseInputMessage]:
        if isinstance(self.input, str):
            return [ResponseInputMessage(role="user", content=self.input)]
        return self.input
