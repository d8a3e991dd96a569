"""OpenAI's Responses API over sluice's streams (issue 17).

A response IS a stream: `resp_<stream id>`. Its events are a pure function of the stream's
entries (`ResponseEvents`): one `response.output_text.delta` per token entry, and a fixed set
of events per `Started` and terminal entry. Replaying from the first entry therefore produces
the same events with the same `sequence_number`s on every API process, and
`starting_after=N` only skips the first N + 1. A small hash (`response_key`) holds what the
stream does not: the owner, the request, the conversation (for `previous_response_id`) and,
once the stream has ended, a copy of its entries, so that a stored response outlives its
stream (`SLUICE_STREAM_TTL_S`) for `SLUICE_RESPONSE_TTL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from arq.connections import ArqRedis

from api.auth import Principal
from api.gateway import Gateway
from api.relay import Waiting, follow
from shared.errors import ErrorBody, SluiceError, StreamNotFound
from shared.protocol import (
    READERS_KEY,
    REDIS_NOW_LUA,
    TERMINAL,
    Entry,
    Failed,
    Finished,
    Started,
    Token,
    decode,
    encode,
    response_key,
    stream_key,
)

log = logging.getLogger("sluice.api")

RESPONSE_PREFIX = "resp_"
MESSAGE_PREFIX = "msg_"
CANCEL_WAIT_S = 5.0
"""How long `cancel` waits for the worker's terminal entry before answering."""

Status = Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
Event = dict[str, Any]

# A background response must run whoever reads it, so its stream is marked as read until the
# job must have ended (by Redis's clock): the supervisor stops only generations nobody reads.
# KEYS: readers. ARGV: stream id, for how long (ms).
_PIN = REDIS_NOW_LUA + "redis.call('ZADD', KEYS[1], redis_now_ms() + tonumber(ARGV[2]), ARGV[1])"


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
    messages: list[dict[str, str]]
    """The conversation without the instructions: what `previous_response_id` continues."""

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ResponseRecord:
        return cls(**json.loads(raw))


@dataclass
class ResponseEvents:
    """Folds a stream's entries into OpenAI's events and the response object they describe."""

    record: ResponseRecord
    sequence: int = 0
    status: Status = "queued"
    started: bool = False
    text: list[str] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    error: ErrorBody | None = None

    @property
    def item_id(self) -> str:
        return MESSAGE_PREFIX + stream_id_of(self.record.id)

    @property
    def output_text(self) -> str:
        return "".join(self.text)

    @property
    def ended(self) -> bool:
        return self.status not in ("queued", "in_progress")

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
                events = []
                if self.status == "queued":
                    self.status = "in_progress"
                    events.append(self._with_response("response.in_progress"))
                item = self._message("in_progress", [])
                events.append(self._event("response.output_item.added", output_index=0, item=item))
                events.append(self._part_event("response.content_part.added", ""))
                return events
            case Token(text):
                self.text.append(text)
                return [self._content_event("response.output_text.delta", delta=text, logprobs=[])]
            case Finished(reason, prompt_tokens, completion_tokens):
                self.usage = (prompt_tokens, completion_tokens)
                self.status = "completed" if reason == "stop" else "incomplete"
                text = self.output_text
                return [
                    self._content_event("response.output_text.done", text=text, logprobs=[]),
                    self._part_event("response.content_part.done", text),
                    self._event(
                        "response.output_item.done", output_index=0, item=self._output()[0]
                    ),
                    self._with_response(f"response.{self.status}"),
                ]
            case Failed(error):
                self.error = error
                self.status = "cancelled" if error.get("code") == "cancelled" else "failed"
                # OpenAI has no `response.cancelled` event: a cancelled stream ends, like a
                # failed one, with `response.failed`, whose response says `cancelled`.
                return [self._with_response("response.failed")]
        return []

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
            "output": self._output(),
            "output_text": self.output_text,
            "parallel_tool_calls": False,
            "previous_response_id": r.previous_response_id,
            "store": r.store,
            "temperature": r.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": r.top_p,
            "truncation": "disabled",
            "usage": usage,
        }

    def _output(self) -> list[dict[str, Any]]:
        if not self.started:
            return []
        status = {"completed": "completed", "in_progress": "in_progress"}.get(
            self.status, "incomplete"
        )
        return [self._message(status, [self._part(self.output_text)])]

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    def _part_event(self, kind: str, text: str) -> Event:
        return self._content_event(kind, part=self._part(text))

    def _content_event(self, kind: str, **fields: Any) -> Event:
        """An event about the one content part of the one output item."""
        return self._event(kind, item_id=self.item_id, output_index=0, content_index=0, **fields)

    def _with_response(self, kind: str) -> Event:
        return self._event(kind, response=self.response())

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event


def error_event(sequence: int, error: ErrorBody) -> Event:
    """A relay that cannot go on (the server shuts down, say): resume after the last event."""
    return {
        "type": "error",
        "sequence_number": sequence,
        "code": error["code"],
        "message": error["message"],
        "param": error["param"],
    }


class ResponseStore:
    """Stored responses of one API process: create, find, follow, cancel, delete."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.redis: ArqRedis = gateway.queue.redis
        self._pin = self.redis.register_script(_PIN)
        self._keepers: set[asyncio.Task[None]] = set()

    @property
    def ttl_s(self) -> int:
        return self.gateway.settings.response_ttl_s

    async def save(self, record: ResponseRecord) -> None:
        """Store the new response; a background one is kept running whoever reads it, and
        this process copies its entries into the hash when it ends."""
        settings = self.gateway.settings
        stream_id = stream_id_of(record.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(response_key(stream_id), "record", record.to_json())
            pipe.expire(response_key(stream_id), self.ttl_s)
            await pipe.execute()
        if record.background:
            pin_ms = int((settings.queue_timeout_s + settings.job_timeout_s) * 1000)
            await self._pin(keys=[READERS_KEY], args=[stream_id, pin_ms])
        keeper = asyncio.get_running_loop().create_task(self._keep(record))
        self._keepers.add(keeper)
        keeper.add_done_callback(self._keepers.discard)

    async def _keep(self, record: ResponseRecord) -> None:
        """Follows the stream to its end and keeps a copy of its entries with the response."""
        stream_id = stream_id_of(record.id)
        entries: list[Entry] = []
        try:
            async for batch in follow(self.gateway.hub, self.gateway.settings, stream_id):
                if not isinstance(batch, Waiting):
                    entries.extend(entry for _, entry in batch)
            await self._snapshot(stream_id, entries)
        except SluiceError as exc:
            log.warning(
                "response %s: not copied (%r); it lives as long as its stream", stream_id, exc
            )

    async def _snapshot(self, stream_id: str, entries: list[Entry]) -> None:
        key = response_key(stream_id)
        if await self.redis.exists(key):
            raw = json.dumps([encode(e) for e in entries])
            await self.redis.hsetnx(key, "entries", raw)  # type: ignore[misc]

    async def find(
        self, resp_id: str, reader: Principal
    ) -> tuple[ResponseRecord, list[Entry] | None]:
        """The response and, once it has ended, its entries; 404 unless it is `reader`'s."""
        stream_id = stream_id_of(resp_id)
        fields: dict[bytes, bytes] = await self.redis.hgetall(response_key(stream_id))  # type: ignore[misc]
        if b"record" not in fields:
            raise ResponseNotFound(f"Response with id '{resp_id}' not found.", param="response_id")
        record = ResponseRecord.from_json(fields[b"record"])
        if not hmac.compare_digest(record.owner, reader.name):
            raise ResponseNotFound(f"Response with id '{resp_id}' not found.", param="response_id")
        stored = fields.get(b"entries")
        if stored is None:
            return record, None
        return record, [decode(k.encode(), v.encode()) for k, v in json.loads(stored)]

    async def entries_now(self, record: ResponseRecord, stored: list[Entry] | None) -> list[Entry]:
        """Every entry written so far (copying them into the hash if the stream has ended)."""
        if stored is not None:
            return stored
        stream_id = stream_id_of(record.id)
        raw = await self.redis.xrange(stream_key(stream_id))
        entries = [decode(*next(iter(fields.items()))) for _, fields in raw]
        if entries and isinstance(entries[-1], TERMINAL):
            await self._snapshot(stream_id, entries)
        return entries

    async def current(self, resp_id: str, reader: Principal) -> ResponseEvents:
        record, stored = await self.find(resp_id, reader)
        state = ResponseEvents(record)
        state.replay(await self.entries_now(record, stored))
        return state

    async def events(
        self, record: ResponseRecord, stored: list[Entry] | None, reader: Principal
    ) -> AsyncIterator[Event]:
        """Every event of the response from the first, live until its last."""
        state = ResponseEvents(record)
        for event in state.opening():
            yield event
        if stored is not None:
            for entry in stored:
                for event in state.feed(entry):
                    yield event
            return
        stream_id = stream_id_of(record.id)
        queue = self.gateway.queue
        try:
            meta = await queue.meta(stream_id, reader)
            exists = await queue.stream_exists(stream_id, meta)
        except StreamNotFound:
            exists = False
        if not exists:  # the stream expired before its entries were copied
            raise ResponseNotFound(f"Response with id '{record.id}' has expired.")
        async for batch in follow(self.gateway.hub, self.gateway.settings, stream_id):
            if isinstance(batch, Waiting):
                yield {}  # a keepalive
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
        await self.redis.delete(response_key(stream_id))
