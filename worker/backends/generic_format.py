"""Tool calls for a model whose chat template knows no tools (SmolLM2's): llama.cpp's "generic"
format (`common/chat.cpp`), under a grammar.

The tools go into the system prompt, and the model answers one JSON object, constrained by a
grammar built from its schema (`answer_schema`):

    {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    {"tool_calls": [{"name": ..., "arguments": {...}}, ...]}       parallel_tool_calls: true
    {"response": "plain text for the user"}                          tool_choice "auto" only

`tool_choice` "required", or naming a tool, leaves only the call (that tool's, if named), so the
arguments always parse and fit their schema; "auto" lets the model choose a call or a response.
As in llama.cpp's server, calls are one at a time unless `parallel_tool_calls` is true.

`AnswerReader` reads the answer as it grows and emits OpenAI's canonical deltas: a call's
opening as soon as its name is whole, its arguments' JSON text as it comes, and a response's
text (decoded from its JSON string) as content. The grammar guarantees the shape, so reading
it needs no general JSON parser: the text is matched piece by piece, from where it stopped.

An earlier turn's calls go back to the model in the same JSON (its assistant message), and a
tool's answer as a user message `{"tool_response": {"tool": name, "content": ...}}`, as
llama.cpp's template polyfills do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from worker.tool_calls import arguments, new_call_id, opening

CALL_INTRO = "You can call any of the following tools to satisfy the user's requests: "
RESPOND_EITHER = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with "
    "`response` reply to the user's request"
)
RESPOND_CALL = "Respond in JSON format with `tool_call`, a request to call a tool"
RESPOND_CALLS = "Respond in JSON format with `tool_calls`, requests to call tools"
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of the model's tools: which it may call, and whether it must."""

    tools: list[dict[str, Any]]
    """The functions it may call (`function` of each chat tool)."""
    required: bool
    parallel: bool

    @classmethod
    def of(
        cls,
        tools: list[dict[str, Any]] | None,
        choice: str | dict[str, Any] | None,
        parallel: bool | None,
    ) -> ToolUse | None:
        """None when no call can be made: no tools, or `tool_choice` "none"."""
        if not tools or choice == "none":
            return None
        functions = [tool["function"] for tool in tools]
        if isinstance(choice, dict):
            named = choice["function"]["name"]
            return cls([f for f in functions if f["name"] == named], True, bool(parallel))
        return cls(functions, choice == "required", bool(parallel))

    def answer_schema(self, response: dict[str, Any] | None) -> dict[str, Any]:
        """The JSON Schema of the answer; `response`: the schema of a response (a string when
        None), where the model may answer instead of calling."""
        calls: list[dict[str, Any]] = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "const": f["name"]},
                    "arguments": f.get("parameters") or NO_PARAMETERS,
                },
                "required": ["name", "arguments"],
            }
            for f in self.tools
        ]
        one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        key, value = "tool_call", one
        if self.parallel:
            key, value = "tool_calls", {"type": "array", "items": one, "minItems": 1}
        call = {"type": "object", "properties": {key: value}, "required": [key]}
        if self.required:
            return call
        answer = {
            "type": "object",
            "properties": {"response": response or {"type": "string"}},
            "required": ["response"],
        }
        return {"anyOf": [call, answer]}

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the template takes it: the tools and the answer's format in the
        system prompt, earlier calls and their answers as JSON text."""
        if self.required:
            respond = RESPOND_CALLS if self.parallel else RESPOND_CALL
        else:
            respond = RESPOND_EITHER
        prompt = CALL_INTRO + json.dumps(self.tools, indent=2) + "\n\n" + respond
        out = plain_turns(messages)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
        return out


def plain_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with earlier calls and their answers as JSON text, for a template that
    knows neither (with no tools offered now too: `tool_choice` "none")."""
    names = _call_names(messages)
    return [_as_text(m, names) for m in messages]


def _call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    return {
        call["id"]: call["function"]["name"] for m in messages for call in m.get("tool_calls") or []
    }


def _as_text(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    content = message.get("content") or ""
    if calls := message.get("tool_calls"):
        made = [
            {"name": c["function"]["name"], "arguments": _json_or_text(c["function"]["arguments"])}
            for c in calls
        ]
        answer = {"tool_call": made[0]} if len(made) == 1 else {"tool_calls": made}
        return {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)}
    if message["role"] == "tool":
        name = names.get(message.get("tool_call_id") or "", "")
        reply = {"tool_response": {"tool": name, "content": content}}
        return {"role": "user", "content": json.dumps(reply, ensure_ascii=False)}
    return message | {"content": content}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- reading the answer ---

# Each piece starts with the space before it (the grammar allows some between tokens): matched
# at the text's end, a piece's own trailing space could still grow.
_SPACE = r"[ \t\n]*"
_HEAD = re.compile(rf'{_SPACE}\{{{_SPACE}"(tool_calls?|response)"{_SPACE}:')
_LIST = re.compile(rf"{_SPACE}\[")
_NAME = re.compile(rf'{_SPACE}\{{{_SPACE}"name"{_SPACE}:{_SPACE}"([^"\\]*)"')
_TO_ARGUMENTS = re.compile(rf'{_SPACE},{_SPACE}"arguments"{_SPACE}:')
_CALL_END = re.compile(rf"{_SPACE}\}}")
_NEXT = re.compile(rf"{_SPACE}(,|\])")
_VALUE_START = re.compile(rf"{_SPACE}([{{\[\"])")
_ESCAPE = re.compile(r'\\(["\\/bfnrt]|u[0-9a-fA-F]{4}(\\u[0-9a-fA-F]{4})?)')
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")


@dataclass
class Emitted:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AnswerReader:
    """The generic format's answer, read as it grows: content text and canonical tool-call
    deltas. `called` once a call has begun; `complete` once the last call is whole."""

    _buffer: str = ""
    _at: int = 0
    _stage: str = "head"
    _calls: int = 0
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _parallel: bool = False
    complete: bool = False

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> Emitted:
        self._buffer += text
        out = Emitted()
        while self._step(out):
            pass
        return out

    def _match(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        found = pattern.match(self._buffer, self._at)
        if found is not None:
            self._at = found.end()
        return found

    def _step(self, out: Emitted) -> bool:
        """Reads what it can at the current stage; False when it needs more text."""
        match self._stage:
            case "head":
                if (found := self._match(_HEAD)) is None:
                    return False
                kind = found[1]
                self._parallel = kind == "tool_calls"
                self._stage = {"response": "response", "tool_call": "call"}.get(kind, "list")
            case "list":
                if self._match(_LIST) is None:
                    return False
                self._stage = "call"
            case "call":
                if (found := self._match(_NAME)) is None:
                    return False
                out.tool_calls.append(opening(self._calls, new_call_id(), found[1]))
                self._calls += 1
                self._stage = "to_arguments"
            case "to_arguments":
                if self._match(_TO_ARGUMENTS) is None:
                    return False
                self._stage = "arguments_start"
            case "arguments_start":
                if (found := _VALUE_START.match(self._buffer, self._at)) is None:
                    return False
                self._at = found.start(1)
                self._stage = "arguments"
            case "arguments":
                fragment, whole = self._scan_value()
                if fragment:
                    out.tool_calls.append(arguments(self._calls - 1, fragment))
                if not whole:
                    return False
                self._stage = "call_end"
            case "call_end":
                if self._match(_CALL_END) is None:
                    return False
                self._stage = "next" if self._parallel else "done"
                self.complete = not self._parallel
            case "next":
                if (found := self._match(_NEXT)) is None:
                    return False
                self._stage = "call" if found[1] == "," else "done"
                self.complete = found[1] == "]"
            case "response" | "response_text" | "response_json":
                return self._response(out)
            case _:
                return False
        return True

    def _scan_value(self) -> tuple[str, bool]:
        """A JSON value's text up to where the buffer ends or the value closes; whether it
        closed."""
        start = self._at
        buffer = self._buffer
        for at in range(start, len(buffer)):
            char = buffer[at]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._at = at + 1
                    return buffer[start : self._at], True
        self._at = len(buffer)
        return buffer[start:], False

    def _response(self, out: Emitted) -> bool:
        """A response's text: a JSON string, decoded as far as it is whole, or (with a response
        format) a JSON value, as its text."""
        buffer = self._buffer
        if self._stage == "response":
            if (found := _VALUE_START.match(buffer, self._at)) is None:
                return False
            self._at = found.end() if found[1] == '"' else found.start(1)
            self._stage = "response_text" if found[1] == '"' else "response_json"
        if self._stage == "response_json":
            text, whole = self._scan_value()
            out.text += text
            if whole:
                self._stage = "done"
            return False
        end = self._at
        while end < len(buffer):
            char = buffer[end]
            if char == '"':
                out.text += _decode(buffer[self._at : end])
                self._at = end + 1
                self._stage = "done"
                return False
            if char == "\\":
                escape = _ESCAPE.match(buffer, end)
                whole = escape is not None and not _HIGH_SURROGATE.search(escape[0])
                if not whole or escape is None or escape.end() == len(buffer):
                    break  # an escape still being written (a surrogate pair's second half)
                end = escape.end()
                continue
            end += 1
        out.text += _decode(buffer[self._at : end])
        self._at = end
        return False


def _decode(raw: str) -> str:
    return json.loads(f'"{raw}"') if raw else ""
