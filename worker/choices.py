"""A job's answer on its way to the stream, choice by choice (`n`): each choice's text (UTF-8
reassembly, stop strings), its tokens' logprobs and tool-call deltas, its token count and why it
ended. A single answer of plain text is written as `Token` entries, as ever; anything richer as
`Delta` entries, so that a resume or a replay reads the same values back."""

from __future__ import annotations

from typing import Any

from shared.protocol import Attempt, Delta, Finished, FinishReason
from shared.schema import GenerationJob
from worker.backends import Generation, Piece
from worker.text import ChoiceText, Released
from worker.writer import StreamWriter


class Answer:
    def __init__(
        self,
        job: GenerationJob,
        generation: Generation,
        writer: StreamWriter,
        attempt: Attempt,
    ) -> None:
        self._job = job
        self._generation = generation
        self._writer = writer
        self._attempt = attempt
        self._choices = [ChoiceText(job.stop) for _ in range(job.n)]
        self._rich = job.n > 1 or job.logprobs
        """Written as deltas: several choices, or logprobs with the text."""

    @property
    def done(self) -> bool:
        return all(choice.done for choice in self._choices)

    async def take(self, item: bytes | Piece) -> bool:
        """Writes what `item` adds to its choice; True once every choice has ended by sluice's
        own decision (a stop string, `max_tokens`), so that the backend can be stopped."""
        if isinstance(item, bytes):  # the common case, kept cheap: a token of choice 0
            index, text, logprobs, tool_calls, reason = 0, item, None, None, None
        else:
            index, text, logprobs = item.index, item.text, item.logprobs
            tool_calls, reason = item.tool_calls, item.finish_reason
        if not 0 <= index < len(self._choices):
            return False  # an engine answering more choices than asked for
        choice = self._choices[index]
        if choice.done:
            return False
        if text or logprobs or tool_calls or reason is None:  # all but a bare finish
            choice.produced += 1
        await self._send(index, choice.feed(text, logprobs), tool_calls)
        if choice.stopped:
            await self._end(index, "stop", stop_backend=True)
        elif reason is not None:
            # The backend ended it; an engine's stream goes on to its usage.
            await self._end(index, reason)
            return False
        elif choice.produced >= self._job.max_tokens and not self._generation.ends_itself:
            await self._end(index, "length", stop_backend=True)
        return self.done

    async def end(self) -> Finished:
        """Ends every choice still open (the backend's pieces ran out); how the stream ends."""
        engine = self._generation.finished
        for index, choice in enumerate(self._choices):
            if not choice.done:
                await self._end(index, engine.reason if engine and index == 0 else "stop")
        if engine is not None:
            return engine
        return Finished(
            self._choices[0].reason or "stop",
            self._generation.prompt_tokens,
            sum(choice.produced for choice in self._choices),
            len(self._choices),
        )

    async def _end(self, index: int, reason: FinishReason, *, stop_backend: bool = False) -> None:
        """The choice's held text goes out; with several choices, with its finish reason (a
        single choice's is the stream's `Finished`)."""
        choice = self._choices[index]
        choice.reason = reason
        tail = choice.flush()
        if len(self._choices) == 1:
            await self._send(index, tail, None)
            return
        await self._writer.send_delta(self._attempt, self._delta(index, tail, None, reason))
        if stop_backend and self._generation.stop_choice is not None:
            self._generation.stop_choice(index)

    async def _send(
        self, index: int, out: Released, tool_calls: list[dict[str, Any]] | None
    ) -> None:
        if not (self._rich or tool_calls or out.logprobs):
            if out.text:
                await self._writer.send(self._attempt, out.text)
            return
        if out.text or out.logprobs or tool_calls:
            await self._writer.send_delta(self._attempt, self._delta(index, out, tool_calls, None))

    @staticmethod
    def _delta(
        index: int,
        out: Released,
        tool_calls: list[dict[str, Any]] | None,
        reason: FinishReason | None,
    ) -> Delta:
        return Delta(
            index,
            out.text,
            out.logprobs or None,
            tool_calls or None,
            reason,
            out.offset if out.logprobs else None,
        )
