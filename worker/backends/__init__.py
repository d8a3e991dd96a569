"""Generation backends: a small protocol and the two implementations."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from shared.schema import GenerationJob
from shared.settings import Settings


@dataclass
class Generation:
    """One job's generation: the prompt's size in tokens, then the tokens' bytes as produced."""

    prompt_tokens: int
    pieces: AsyncGenerator[bytes, None]


class Backend(Protocol):
    max_concurrency: int
    """How many jobs one worker process can really serve at once."""

    async def start(self, job: GenerationJob) -> Generation: ...

    def close(self) -> None: ...


class BackendError(RuntimeError):
    """The backend failed while generating; the job's stream ends with an error event."""


def load_backend(settings: Settings) -> Backend:
    if settings.backend == "synthetic":
        from worker.backends.synthetic import SyntheticBackend

        return SyntheticBackend(settings.synthetic_tokens_per_s)
    from worker.backends.llama import LlamaBackend

    return LlamaBackend(settings)
