"""Tools and structured outputs on the wire (issue 22): the request models for function tools,
`tool_choice` and `response_format`, the checks OpenAI makes on them, and the job's view of them.

A request's tools reach a worker in Chat Completions' shape, whichever API they came in by:
`{"type": "function", "function": {"name", "description", "parameters", "strict"}}`; a
`tool_choice` as `"none"`, `"auto"`, `"required"` or the name of one tool; a response format as
`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", ...}}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from shared.errors import InvalidRequest, UnsupportedParameter

MAX_TOOLS = 128
"""OpenAI's own cap on the tools of one request."""
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

ToolName = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]
JsonSchema = dict[str, Any]
ToolChoiceMode = Literal["none", "auto", "required"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _PassedOn(_Model):
    """Sent to an engine as the client gave it: fields sluice does not know are kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class FunctionDefinition(_PassedOn):
    name: ToolName
    description: StrictStr | None = None
    parameters: JsonSchema | None = None
    strict: StrictBool | None = None


class ChatTool(_PassedOn):
    """A function tool as Chat Completions takes it."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Model):
    name: StrictStr


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: FunctionName


ChatToolChoice = ToolChoiceMode | NamedToolChoice


class JsonSchemaFormat(_PassedOn):
    name: ToolName
    description: StrictStr | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_PassedOn):
    """`response_format`: plain text, any JSON object, or JSON that fits a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionCall(_Model):
    name: StrictStr
    arguments: StrictStr


class MessageToolCall(_Model):
    """A call the assistant made, as the next turn's request carries it back."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


def check_schema(schema: JsonSchema, param: str) -> None:
    """A 400 naming where `schema` is not a JSON Schema (by its own `$schema`'s metaschema,
    else draft 2020-12), as OpenAI refuses one."""
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise InvalidRequest(
            f"invalid JSON schema at '{param}{where}': {exc.message}", param=f"{param}{where}"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"'{param}' is nested too deeply", param=param) from None


def chat_tools(tools: list[ChatTool], *, flat: bool = False) -> list[dict[str, Any]]:
    """The tools as a job carries them; each one's parameters a valid JSON Schema, names unique
    (`flat`: named in errors as the Responses API spells them)."""
    seen: set[str] = set()
    for n, tool in enumerate(tools):
        function = tool.function
        at = f"tools[{n}]" if flat else f"tools[{n}].function"
        if function.name in seen:
            raise InvalidRequest(
                f"tool names must be unique: '{function.name}' is given twice", param=f"{at}.name"
            )
        seen.add(function.name)
        if function.parameters is not None:
            check_schema(function.parameters, f"{at}.parameters")
    return [tool.model_dump(exclude_none=True) for tool in tools]


def tool_choice(
    choice: ChatToolChoice | None, tools: list[dict[str, Any]] | None
) -> str | dict[str, Any] | None:
    """The tool choice as a job carries it: a mode, or `{"type": "function", "function":
    {"name"}}` naming one of `tools`."""
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice != "none" and not tools:
            raise InvalidRequest(f"tool_choice '{choice}' needs 'tools'", param="tool_choice")
        return choice
    names = {tool["function"]["name"] for tool in tools or []}
    if choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names the function '{choice.function.name}', which is not in 'tools'",
            param="tool_choice",
        )
    return choice.model_dump()


def response_format(
    format: ResponseFormat | None, param: str = "response_format"
) -> dict[str, Any] | None:
    """The response format as a job carries it (None for plain text); a schema must be one."""
    if format is None or format.type == "text":
        return None
    if format.type == "json_object":
        return {"type": "json_object"}
    if format.json_schema is None:
        raise InvalidRequest(
            f"'{param}' of type 'json_schema' needs 'json_schema'", param=f"{param}.json_schema"
        )
    schema = format.json_schema.schema_
    if schema is not None:
        at = f"{param}.schema" if param == "text.format" else f"{param}.json_schema.schema"
        check_schema(schema, at)
    return {
        "type": "json_schema",
        "json_schema": format.json_schema.model_dump(by_alias=True, exclude_none=True),
    }


def check_tool_replies(
    messages: list[dict[str, Any]],
    param: str = "messages",
    earlier: list[dict[str, Any]] | None = None,
) -> None:
    """Every `tool` message answers a call an earlier assistant message made (in `messages`, or
    in the `earlier` turns they continue), as OpenAI requires."""
    calls = {call["id"] for m in earlier or [] for call in m.get("tool_calls") or []}
    for n, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            calls.add(call["id"])
        if message["role"] == "tool" and message.get("tool_call_id") not in calls:
            raise InvalidRequest(
                f"{param}[{n}] answers the tool call '{message.get('tool_call_id')}', which no "
                "earlier assistant message made",
                param=f"{param}[{n}].tool_call_id",
            )


def accumulate_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Folds canonical tool-call deltas into whole calls, as the openai SDK's accumulator does:
    the first delta of call `index` opens it, later ones add to its arguments."""
    for delta in deltas:
        index = delta["index"]
        if index == len(calls):
            function = delta.get("function") or {}
            calls.append(
                {
                    "id": delta.get("id"),
                    "type": "function",
                    "function": {"name": function.get("name"), "arguments": ""},
                }
            )
        calls[index]["function"]["arguments"] += (delta.get("function") or {}).get(
            "arguments"
        ) or ""


# --- the Responses API's shapes of the same things ---


class ResponseTool(_PassedOn):
    """A tool as the Responses API takes it: flat. Only function tools are served."""

    type: StrictStr
    name: ToolName | None = None
    description: StrictStr | None = None
    parameters: JsonSchema | None = None
    strict: StrictBool | None = None


class ResponseNamedChoice(_Model):
    type: Literal["function"]
    name: StrictStr


ResponseToolChoice = ToolChoiceMode | ResponseNamedChoice


class ResponseTextFormat(_PassedOn):
    """`text.format`: the Responses API's `response_format`, flat."""

    type: Literal["text", "json_object", "json_schema"]
    name: ToolName | None = None
    description: StrictStr | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseText(_PassedOn):
    format: ResponseTextFormat | None = None


def responses_tools(tools: list[ResponseTool]) -> list[ChatTool]:
    """Flat function tools as Chat Completions nests them; any other kind is refused by name."""
    out = []
    for n, tool in enumerate(tools):
        if tool.type != "function":
            raise UnsupportedParameter(
                f"tools[{n}].type {tool.type!r} is not supported; only 'function' tools are",
                param=f"tools[{n}].type",
            )
        if tool.name is None:
            raise InvalidRequest("a function tool needs 'name'", param=f"tools[{n}].name")
        fields = tool.model_dump(exclude={"type"}, exclude_none=True)
        out.append(ChatTool(type="function", function=FunctionDefinition(**fields)))
    return out


def responses_tool_choice(choice: ResponseToolChoice | None) -> ChatToolChoice | None:
    if isinstance(choice, ResponseNamedChoice):
        return NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    return choice


def responses_format(text: ResponseText | None) -> ResponseFormat | None:
    """`text.format` as Chat Completions' `response_format`."""
    format = text.format if text is not None else None
    if format is None or format.type != "json_schema":
        return None if format is None else ResponseFormat(type=format.type)
    if format.name is None:
        raise InvalidRequest("a 'json_schema' format needs 'name'", param="text.format.name")
    fields = format.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(**fields))


class FunctionCallItem(_Model):
    """A call the model made, echoed back in the next request's `input`."""

    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class FunctionCallOutputItem(_Model):
    """The answer to a call, in the next request's `input`."""

    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(str(part.get("text") or "") for part in self.output)
