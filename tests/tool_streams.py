"""What every tools test checks of a chat stream: OpenAI's canonical tool-call deltas, and what
the openai SDK's own accumulator makes of the chunks."""

from __future__ import annotations

from typing import Any

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk


def accumulated(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The message the SDK's `ChatCompletionStreamState` builds from `chunks` (the usage chunk
    and errors aside): its content, its calls as `(name, arguments)`, its finish reason."""
    state = ChatCompletionStreamState()
    for chunk in chunks:
        if chunk.get("choices"):
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    choice = state.current_completion_snapshot.choices[0]
    calls = choice.message.tool_calls or []
    return {
        "content": choice.message.content or "",
        "calls": [(c.function.name, c.function.arguments) for c in calls],
        "ids": [c.id for c in calls],
        "finish_reason": choice.finish_reason,
    }


def assert_canonical(chunks: list[dict[str, Any]]) -> None:
    """The tool-call deltas are OpenAI's canonical ones: a call's first delta has `index`, `id`,
    `type`, `function.name` and `arguments: ""`; later ones only `index` and arguments; indices
    dense from 0, each call whole before the next starts; one finish, `tool_calls`."""
    deltas = [
        delta
        for chunk in chunks
        for choice in chunk.get("choices", [])
        for delta in choice.get("delta", {}).get("tool_calls") or []
    ]
    assert deltas, "no tool call"
    opened = -1
    for delta in deltas:
        if delta["index"] == opened + 1:
            opened += 1
            assert set(delta) == {"index", "id", "type", "function"}, delta
            assert delta["type"] == "function"
            assert delta["id"]
            assert delta["function"]["name"]
            assert delta["function"]["arguments"] == ""
        else:
            assert delta["index"] == opened, f"call {delta['index']} after call {opened}"
            assert set(delta) == {"index", "function"}, delta
            assert set(delta["function"]) == {"arguments"}, delta
    finishes = [
        choice["finish_reason"]
        for chunk in chunks
        for choice in chunk.get("choices", [])
        if choice.get("finish_reason")
    ]
    assert finishes == ["tool_calls"]
