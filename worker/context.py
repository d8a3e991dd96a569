"""What every job of a worker shares, made once when the worker starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.commands.core import AsyncScript

from shared.settings import Settings
from worker.backends import Backend
from worker.control import JobControl
from worker.writer import StreamWriter

CONTEXT = "sluice"
"""Where arq's job context (`ctx`) holds the `WorkerContext`."""


@dataclass(frozen=True, slots=True)
class WorkerContext:
    settings: Settings
    backend: Backend
    worker_id: str
    writer: StreamWriter
    control: JobControl
    claim: AsyncScript
    """shared/lua/claim_stream.lua"""
    hand_back: AsyncScript
    """shared/lua/hand_back.lua"""

    @classmethod
    def of(cls, ctx: dict[str, Any]) -> WorkerContext:
        """The worker's context, from arq's job context."""
        found: WorkerContext = ctx[CONTEXT]
        return found
