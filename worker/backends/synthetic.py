"""Deterministic text at a set rate, for pipeline tests and load benchmarks. Never the default.

The text echoes the prompt (a chat's last message), then a fixed passage, so each stream's
content is its own; a chat's earlier turns (its user and assistant messages, not system prompts)
follow, each by its role and first words, so a test can see the whole conversation reached the
worker. With `n`, every choice gets the same text, its pieces interleaved; with `logprobs`, each
word is certain (logprob 0). Like a real model, the first token comes one token-time after the
start. Two directives
in the prompt stand in for faults: `[[fail after N]]` raises a BackendError after N tokens (a
mid-stream error), and `[[crash after N]]` kills the worker process outright after N tokens (a
segfault).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncGenerator, Iterator

from shared.errors import UnsupportedParameter
from shared.schema import GenerationJob
from worker.backends import BackendError, Generation, Piece, text_messages

PASSAGE = (
    "Streaming sends each token to the client as soon as the model produces it, so the reader "
    "sees the answer grow instead of waiting for the whole of it. A queue between the web tier "
    "and the workers lets each side scale on its own: more workers give more throughput, and "
    "the gateway only relays what the workers write. Every stream ends with a final event, so "
    "no client is left waiting for a response that will never come."
)
DEFAULT_MAX_JOBS = 512
"""Jobs one worker runs at once unless SLUICE_WORKER_MAX_JOBS says otherwise."""
FAULT = re.compile(r"\[\[(fail|crash) after (\d+)\]\]")
RECAP_WORDS = 5
"""Words of each earlier message that the text repeats."""
CONVERSATION_ROLES = {"user", "assistant"}


def words(text: str) -> list[bytes]:
    return [m.encode() for m in re.findall(r"\s*\S+", text)]


def recap(messages: list[dict[str, str]]) -> str:
    """`Earlier: user: first words | assistant: first words`."""
    said = (f"{m['role']}: {' '.join(m['content'].split()[:RECAP_WORDS])}" for m in messages)
    return "Earlier: " + " | ".join(said)


class SyntheticBackend:
    available = True

    def __init__(
        self,
        tokens_per_s: float,
        max_concurrency: int = DEFAULT_MAX_JOBS,
        *,
        model: str = "synthetic",
        n_ctx: int | None = None,
    ) -> None:
        self.tokens_per_s = tokens_per_s
        self.max_concurrency = max_concurrency
        self.model = model
        self.n_ctx = n_ctx

    async def start(self, job: GenerationJob) -> Generation:
        if job.logit_bias:
            raise UnsupportedParameter("the synthetic backend has no tokens", param="logit_bias")
        earlier: list[dict[str, str]] = []
        if job.prompt is not None:
            prompt = job.prompt
        else:
            *before, last = text_messages(job.messages or [{}])
            prompt = last.get("content", "")
            earlier = [m for m in before if m["role"] in CONVERSATION_ROLES]
        fault = FAULT.search(prompt)
        text = f"You asked: {prompt.strip()}\n\n{PASSAGE}"
        if earlier:
            text += "\n\n" + recap(earlier)
        pieces = list(_choices(words(text), job))
        return Generation(
            len(words(prompt)),
            self._pace(pieces, (fault[1], int(fault[2])) if fault else None),
        )

    async def _pace(
        self, pieces: list[bytes | Piece], fault: tuple[str, int] | None
    ) -> AsyncGenerator[bytes | Piece, None]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, piece in enumerate(pieces):
            # A fault comes when its token would have: one token-time after the last one.
            if self.tokens_per_s:
                await asyncio.sleep(max(0.0, start + (n + 1) / self.tokens_per_s - loop.time()))
            else:
                await asyncio.sleep(0)
            if fault is not None and n == fault[1]:
                if fault[0] == "crash":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise BackendError(f"synthetic failure after {n} tokens")
            yield piece

    def close(self) -> None:
        pass


def _choices(pieces: list[bytes], job: GenerationJob) -> Iterator[bytes | Piece]:
    if job.n == 1 and not job.logprobs:
        yield from pieces
        return
    for piece in pieces:
        for index in range(job.n):
            certain = {"token": piece.decode(), "logprob": 0.0, "bytes": list(piece)}
            alternatives = [certain][: job.top_logprobs]
            logprobs = [certain | {"top_logprobs": alternatives}] if job.logprobs else None
            yield Piece(piece, index, logprobs)
