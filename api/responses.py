"""OpenAI's Responses API over sluice's streams (issue 17).

A response IS a stream: `resp_<stream id>`. Its events are a pure function of the stream's
entries (`ResponseEvents`): one `response.output_text.delta` per token entry, a function call's
`response.function_call_arguments.delta` per fragment of its arguments, and a fixed set of
events per `Started`, output item and terminal entry. Replaying from the first entry therefore
produces the same events with the same `sequence_number`s on every API process, and
`starting_after=N` only skips the first N + 1. A small hash (`response_key`) holds what the
stream does not: the owner, the request and the conversation (for `previous_response_id`). A
stored response's stream is kept `SLUICE_RESPONSE_TTL_S` after its end, not
`SLUICE_STREAM_TTL_S` (its metadata's `keep`, applied by the append that ends it, whichever
process or worker writes it), and a background one's stream is `pinned`: it runs whoever reads
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from arq.connections import ArqRedis

from api.auth import Principal
from api.gateway import Gateway
from api.metrics import RequestClock
from api.relay import Waiting, follow
from shared.errors import ErrorBody, SluiceError, StreamNotFound
from shared.protocol import (
    Delta,
    Entry,
    Failed,
    Finished,
    Started,
    Token,
    check_complete,
    check_continuous,
    decode,
    meta_key,
    response_key,
    stream_key,
)

RESPONSE_PREFIX = "resp_"
MESSAGE_PREFIX = "msg_"
CALL_ITEM_PREFIX = "fc_"
CANCEL_WAIT_S = 5.0
"""How long `cancel` waits for the worker's terminal entry before answering."""

Status = Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
Event = dict[str, Any]


class ResponseNotFound(StreamNotFound):
    code = "not_found"


def response_id(stream_id: str) -> str:
    return RESPONSE_PREFIX + stream_id


def stream_id_of(resp_id: str) -> str:
    return resp_id.removeprefix(RESPONSE_PREFIX)


@dataclass(frozen=True)
class ResponseRecord:
    """What the stream does not say about a response: written once, when it is created."""

    id: str
    owner: str
    created_at: int
    model: str
    background: bool
    store: bool
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    metadata: dict[str, str]
    previous_response_id: str | None
    messages: list[dict[str, Any]]
    """The conversation without the instructions: what `previous_response_id` continues."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """As the request gave them (flat function tools)."""
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text_format: dict[str, Any] = field(default_factory=lambda: {"type": "text"})

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ResponseRecord:
        return cls(**json.loads(raw))


@dataclass
class _Message:
    """An output item of text."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False


@dataclass
class _Call:
    """An output item that calls a function."""

    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    done: bool = False


@dataclass
class ResponseEvents:
    """Folds a stream's entries into OpenAI's events and the response object they describe.

    Output items open as the stream gets to them: a message at its first text, a function call
    at its first delta (`id` and `name`), and each closes when the next opens or the stream
    ends; a stream with no output at all still answers one (empty) message."""

    record: ResponseRecord
    sequence: int = 0
    status: Status = "queued"
    started: bool = False
    items: list[_Message | _Call] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    error: ErrorBody | None = None

    @property
    def output_text(self) -> str:
        return "".join("".join(i.text) for i in self.items if isinstance(i, _Message))

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls made, in Chat Completions' shape (for the conversation's next turn)."""
        return [
            {
                "id": i.call_id,
                "type": "function",
                "function": {"name": i.name, "arguments": "".join(i.arguments)},
            }
            for i in self.items
            if isinstance(i, _Call)
        ]

    @property
    def ended(self) -> bool:
        return self.status not in ("queued", "in_progress")

    def answer(self) -> dict[str, Any]:
        """The answer as the conversation's next turn carries it: an assistant message."""
        calls = self.tool_calls
        message: dict[str, Any] = {"role": "assistant", "content": self.output_text or None}
        if calls:
            message["tool_calls"] = calls
        else:
            message["content"] = self.output_text
        return message

    def opening(self) -> list[Event]:
        """The events before any entry: `response.created` (and `response.queued`)."""
        if not self.record.background:
            self.status = "in_progress"
            return [
                self._with_response("response.created"),
                self._with_response("response.in_progress"),
            ]
        return [self._with_response("response.created"), self._with_response("response.queued")]

    def feed(self, entry: Entry) -> list[Event]:
        match entry:
            case Started() if not self.started:
                self.started = True
                if self.status == "queued":
                    self.status = "in_progress"
                    return [self._with_response("response.in_progress")]
            case Token(text):
                return self._text(text)
            case Delta(0, text, logprobs, tool_calls):
                events = self._text(text, logprobs or []) if text or logprobs else []
                for delta in tool_calls or []:
                    events += self._call_delta(delta)
                return events
            case Finished(reason, prompt_tokens, completion_tokens):
                self.usage = (prompt_tokens, completion_tokens)
                self.status = "incomplete" if reason == "length" else "completed"
                events = self._close() if self.items else self._open_message()
                if not self.items[-1].done:
                    events += self._close()
                return [*events, self._with_response(f"response.{self.status}")]
            case Failed(error):
                self.error = error
                self.status = "cancelled" if error.get("code") == "cancelled" else "failed"
                # OpenAI has no `response.cancelled` event: a cancelled stream ends, like a
                # failed one, with `response.failed`, whose response says `cancelled`.
                return [self._with_response("response.failed")]
        return []

    def _text(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[Event]:
        events = []
        if not self.items or not isinstance(self.items[-1], _Message) or self.items[-1].done:
            events = self._close() + self._open_message()
        message = self.items[-1]
        assert isinstance(message, _Message)
        message.text.append(text)
        message.logprobs += logprobs or []
        delta = self._content_event(
            "response.output_text.delta", delta=text, logprobs=logprobs or []
        )
        return [*events, delta]

    def _call_delta(self, delta: dict[str, Any]) -> list[Event]:
        function = delta.get("function") or {}
        if "id" in delta:  # a call's first delta
            events = self._close()
            self.items.append(_Call(delta["id"], function.get("name") or ""))
            item = self._item(len(self.items) - 1)
            return [
                *events,
                self._event(
                    "response.output_item.added", output_index=len(self.items) - 1, item=item
                ),
            ]
        call = self.items[-1]
        assert isinstance(call, _Call)
        fragment = function.get("arguments") or ""
        call.arguments.append(fragment)
        return [self._item_event("response.function_call_arguments.delta", delta=fragment)]

    def _open_message(self) -> list[Event]:
        self.items.append(_Message())
        index = len(self.items) - 1
        return [
            self._event("response.output_item.added", output_index=index, item=self._item(index)),
            self._part_event("response.content_part.added", _Message()),
        ]

    def _close(self) -> list[Event]:
        """The events that close the last output item, if it is open."""
        if not self.items or self.items[-1].done:
            return []
        last = self.items[-1]
        last.done = True
        if isinstance(last, _Call):
            arguments = "".join(last.arguments)
            events = [
                self._item_event(
                    "response.function_call_arguments.done", name=last.name, arguments=arguments
                )
            ]
        else:
            text = "".join(last.text)
            events = [
                self._content_event("response.output_text.done", text=text, logprobs=last.logprobs),
                self._part_event("response.content_part.done", last),
            ]
        index = len(self.items) - 1
        item = self._item(index)
        return [*events, self._event("response.output_item.done", output_index=index, item=item)]

    def replay(self, entries: Iterable[Entry]) -> list[Event]:
        events = self.opening()
        for entry in entries:
            events.extend(self.feed(entry))
        return events

    def response(self) -> dict[str, Any]:
        """The response object as it stands (`GET /v1/responses/{id}`)."""
        r = self.record
        usage = None
        if self.usage is not None:
            prompt, completion = self.usage
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        error = None
        if self.error is not None and self.status == "failed":
            error = {
                "code": self.error.get("code") or "server_error",
                "message": self.error["message"],
            }
        return {
            "id": r.id,
            "object": "response",
            "created_at": r.created_at,
            "status": self.status,
            "background": r.background,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if self.status == "incomplete"
            else None,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "metadata": r.metadata,
            "model": r.model,
            "output": [self._item(n) for n in range(len(self.items))],
            "output_text": self.output_text,
            "parallel_tool_calls": r.parallel_tool_calls,
            "previous_response_id": r.previous_response_id,
            "store": r.store,
            "temperature": r.temperature,
            "text": {"format": r.text_format},
            "tool_choice": r.tool_choice,
            "tools": r.tools,
            "top_p": r.top_p,
            "truncation": "disabled",
            "usage": usage,
        }

    def _item_id(self, index: int) -> str:
        stream_id = stream_id_of(self.record.id)
        if isinstance(self.items[index], _Call):
            return f"{CALL_ITEM_PREFIX}{stream_id}_{index}"
        # The first item keeps the id every text answer's one message had before tools.
        return MESSAGE_PREFIX + stream_id + (f"_{index}" if index else "")

    def _item(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        status = "in_progress"
        if item.done:
            status = "completed" if self.status in ("in_progress", "completed") else "incomplete"
        elif self.ended:
            status = "incomplete"
        if isinstance(item, _Call):
            return {
                "id": self._item_id(index),
                "type": "function_call",
                "status": status,
                "call_id": item.call_id,
                "name": item.name,
                "arguments": "".join(item.arguments),
            }
        content = [self._part(item)] if item.done or item.text else []
        return {
            "id": self._item_id(index),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    @staticmethod
    def _part(message: _Message) -> dict[str, Any]:
        part = {"type": "output_text", "text": "".join(message.text), "annotations": []}
        return part | {"logprobs": message.logprobs} if message.logprobs else part

    def _part_event(self, kind: str, message: _Message) -> Event:
        return self._content_event(kind, part=self._part(message))

    def _item_event(self, kind: str, **fields: Any) -> Event:
        """An event about the last output item."""
        index = len(self.items) - 1
        return self._event(kind, item_id=self._item_id(index), output_index=index, **fields)

    def _content_event(self, kind: str, **fields: Any) -> Event:
        """An event about the one content part of the last output item, a message."""
        return self._item_event(kind, content_index=0, **fields)

    def _with_response(self, kind: str) -> Event:
        return self._event(kind, response=self.response())

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event


def error_event(last_sequence: int, error: ErrorBody) -> Event:
    """A relay that cannot go on (the server shuts down, say). It takes no number of its own:
    it carries the last event's, so `starting_after` it resumes exactly after that event, and
    the response's own next event keeps its number."""
    return {
        "type": "error",
        "sequence_number": last_sequence,
        "code": error["code"],
        "message": error["message"],
        "param": error["param"],
    }


class ResponseStore:
    """Stored responses of one API process: create, find, follow, cancel, delete."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.redis: ArqRedis = gateway.queue.redis

    @property
    def ttl_s(self) -> int:
        return self.gateway.settings.response_ttl_s

    async def save(self, record: ResponseRecord) -> None:
        stream_id = stream_id_of(record.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(response_key(stream_id), "record", record.to_json())
            pipe.expire(response_key(stream_id), self.ttl_s)
            await pipe.execute()

    async def find(self, resp_id: str, reader: Principal) -> ResponseRecord:
        """The response; 404 unless it is `reader`'s."""
        stream_id = stream_id_of(resp_id)
        raw = await self.redis.hget(response_key(stream_id), "record")  # type: ignore[misc]
        record = ResponseRecord.from_json(raw) if raw is not None else None
        if record is None or not hmac.compare_digest(record.owner, reader.name):
            raise ResponseNotFound(f"Response with id '{resp_id}' not found.", param="response_id")
        return record

    async def entries_now(self, record: ResponseRecord) -> list[Entry]:
        """Every entry written so far."""
        raw = await self.redis.xrange(stream_key(stream_id_of(record.id)))
        entries = [decode(*next(iter(fields.items()))) for _, fields in raw]
        if entries:
            check_complete(entries[0])
            check_continuous(0, (entry_id.decode() for entry_id, _ in raw))
        return entries

    async def current(self, resp_id: str, reader: Principal) -> ResponseEvents:
        record = await self.find(resp_id, reader)
        state = ResponseEvents(record)
        state.replay(await self.entries_now(record))
        return state

    async def events(
        self, record: ResponseRecord, reader: Principal, clock: RequestClock
    ) -> AsyncIterator[Event]:
        """Every event of the response from the first, live until its last; `{}` for a
        keepalive while nothing happens."""
        state = ResponseEvents(record)
        for event in state.opening():
            yield event
        stream_id = stream_id_of(record.id)
        queue = self.gateway.queue
        try:
            meta = await queue.meta(stream_id, reader)
            exists = await queue.stream_exists(stream_id, meta)
        except StreamNotFound:
            exists = False
        if not exists:
            raise ResponseNotFound(f"Response with id '{record.id}' has expired.")
        async for batch in self.gateway.entries(stream_id, clock):
            if isinstance(batch, Waiting):
                yield {}
                continue
            for _, entry in batch:
                for event in state.feed(entry):
                    yield event

    async def cancel(self, resp_id: str, reader: Principal) -> ResponseEvents:
        """Stops the response's generation and waits (briefly) for its stream to say so."""
        state = await self.current(resp_id, reader)
        if not state.ended:
            stream_id = stream_id_of(resp_id)
            with contextlib.suppress(SluiceError):
                await self.gateway.queue.cancel(stream_id, reader)
            with contextlib.suppress(TimeoutError, SluiceError):
                async with asyncio.timeout(CANCEL_WAIT_S):
                    async for _ in follow(self.gateway.hub, self.gateway.settings, stream_id):
                        pass
            state = await self.current(resp_id, reader)
        return state

    async def delete(self, resp_id: str, reader: Principal) -> None:
        state = await self.current(resp_id, reader)
        stream_id = stream_id_of(resp_id)
        if not state.ended:
            with contextlib.suppress(SluiceError):
                await self.gateway.queue.cancel(stream_id, reader)
        # Its stream is kept no longer than any other: a stream TTL from its end.
        stream_ttl_s = self.gateway.settings.stream_ttl_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(response_key(stream_id))
            pipe.hdel(meta_key(stream_id), "keep")
            if state.ended:
                pipe.expire(stream_key(stream_id), stream_ttl_s)
                pipe.expire(meta_key(stream_id), stream_ttl_s)
            await pipe.execute()
