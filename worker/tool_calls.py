"""Tool calls in OpenAI's canonical streaming shape, the one the openai SDK's accumulator needs
(`lib/streaming/_deltas.py`): the first delta of call `index` carries `index`, `id`, `type`,
`function.name` and `arguments: ""`; later deltas only `index` and `function.arguments`
fragments; indices are dense from 0, and a call is whole before the next index starts.

`EngineCalls` turns whatever an engine sends into that shape. Engines differ: llama-cpp-python
and LiteLLM repeat `id`, `type` and `name` on every chunk (strings that an accumulator would
concatenate into `get_weatherget_weather`), Ollama sends whole calls without `index`, some start
indices at 1 or send arguments as an object.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def opening(index: int, call_id: str, name: str) -> dict[str, Any]:
    """The first delta of call `index`."""
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }


def arguments(index: int, fragment: str) -> dict[str, Any]:
    """A later delta of call `index`: more of its arguments' JSON text."""
    return {"index": index, "function": {"arguments": fragment}}


@dataclass
class EngineCalls:
    """One stream's tool-call deltas from an engine → canonical deltas."""

    ids: list[str] = field(default_factory=list)
    """The calls opened so far, by canonical index: their ids (the engine's, or made here)."""
    _by_engine_index: dict[Any, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.ids)

    def feed(self, deltas: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for delta in deltas:
            if isinstance(delta, dict):
                out.extend(self._one(delta))
        return out

    def _one(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        function = delta.get("function")
        function = function if isinstance(function, dict) else {}
        name, call_id = function.get("name"), delta.get("id")
        index = self._index(delta.get("index"), call_id, name)
        out: list[dict[str, Any]] = []
        if index is None:  # a new call
            if not name:
                return []  # arguments for a call never named: nothing a client could place
            index = len(self.ids)
            self.ids.append(call_id if isinstance(call_id, str) and call_id else new_call_id())
            if "index" in delta:
                self._by_engine_index[delta["index"]] = index
            out.append(opening(index, self.ids[index], str(name)))
        fragment = function.get("arguments")
        if isinstance(fragment, dict | list):  # whole arguments as JSON, not as text
            fragment = json.dumps(fragment, ensure_ascii=False)
        if isinstance(fragment, str) and fragment:
            out.append(arguments(index, fragment))
        return out

    def _index(self, engine_index: Any, call_id: Any, name: Any) -> int | None:
        """The canonical index of the call this delta continues, or None for a new call."""
        if engine_index is not None:
            return self._by_engine_index.get(engine_index)
        if isinstance(call_id, str) and call_id in self.ids:
            return self.ids.index(call_id)
        if call_id or name or not self.ids:
            return None  # no index and a call of its own (Ollama sends each call whole)
        return len(self.ids) - 1
