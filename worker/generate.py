"""The job: one attempt at a stream. It claims the stream, starts the backend, relays its text to
the stream, and ends it with exactly one terminal entry, whatever happens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from datetime import datetime
from typing import Any, TypeVar

from redis.exceptions import RedisError

from shared import tracing
from shared.arq_internals import CLAIMED, Claimed
from shared.errors import GenerationFailed, RedisFailover, RemoteError, SluiceError
from shared.logs import bind
from shared.protocol import (
    Attempt,
    Entry,
    Failed,
    Finished,
    Started,
    job_deadline_ms,
    jobs_key,
)
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import BackendError, Generation
from worker.choices import Answer
from worker.context import WorkerContext
from worker.control import HandedBack, StopSignal
from worker.give_back import GiveBack
from worker.metrics import TOKENS
from worker.writer import EntriesLost, Fenced, TextLost

log = logging.getLogger("sluice.worker")

MAX_BACKOFF_S = 2.0
LOST_IN_FAILOVER = (
    "Redis failed over and lost part of this answer before a replica had it; it cannot be "
    "completed without a gap"
)
T = TypeVar("T")


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """arq's job function."""
    request = GenerationJob.model_validate(payload)
    claimed: Claimed = ctx[CLAIMED]
    await Job(WorkerContext.of(ctx), request, claimed, ctx["enqueue_time"]).run()


class Job:
    """One attempt at a stream, phase by phase: `claim`, `start`, `relay`, `finish`."""

    def __init__(
        self, worker: WorkerContext, request: GenerationJob, claimed: Claimed, enqueued: datetime
    ) -> None:
        self.worker = worker
        self.request = request
        self.attempt = Attempt(request.stream_id, claimed.job_id)
        self.claimed = claimed
        """What the claim that took the job found (shared/lua/claim_jobs.lua); its `claim` names
        this run of the attempt (arq may hand an attempt out again if a failover lost its claim):
        shared/lua/lib/claim.lua lets one run have it."""
        self.enqueued = enqueued
        self.first_piece_ms: float | None = None
        self.settled = False
        """Nothing more is this attempt's to do: it wrote the stream's end, or lost the stream."""
        self.engine_counts_prompt = False
        """Its backend's engine says how long the prompt was only at the end (`ends_itself`)."""

    async def run(self) -> None:
        bind(self.request.stream_id, self.request.key_name)
        parent = tracing.parent_of(self.request.trace)
        claimed = await self.claim(parent)
        if claimed is None:
            log.info("job %s is no longer wanted; skipped", self.attempt.job)
            return
        cancelled, claimed_ms, entries = claimed
        # Its entries follow the stream's, one by one: a failover that loses some is noticed.
        self.worker.writer.begin(self.attempt, entries, self.claimed.claim)
        span = tracing.start_span("generate", parent=parent)
        if span is not None:
            span.set_attribute("sluice.worker", self.worker.worker_id)
        signal = self.worker.control.watch(self.request.stream_id)
        if cancelled:
            signal.stop("cancelled")
        try:
            await self.generate(signal, claimed_ms)
        except Fenced:
            # The supervisor ended the stream or gave it to a newer attempt while this one was
            # presumed dead (a frozen process, a long pause): it has nothing more to say.
            log.warning("job %s lost its stream to the supervisor; stopped", self.attempt.job)
            self.settled = True
        except HandedBack:
            log.warning(
                "job %s given back: its engine does not answer, another worker's does",
                self.attempt.job,
            )
            self.settled = True
        finally:
            if not self.settled:  # it stops without its stream's end: the supervisor sees to it
                self.worker.control.let_go(self.attempt.job)
            self.worker.control.release(self.request.stream_id)
            self.worker.writer.end(self.attempt)
            if span is not None:
                span.end()

    async def claim(self, parent: Any) -> tuple[bool, int, int] | None:
        """The stream's claim for this attempt: whether it was cancelled before it started,
        when it was claimed and how many entries the stream has; None if it is no longer wanted.
        The claim that took the job made it, unless Redis refused it then: it is made again
        (shared/lua/claim_stream.lua), and tried while Redis refuses."""
        start_ns = int(self.enqueued.timestamp() * 1_000_000_000)
        queue_span = tracing.start_span("queue", parent=parent, start_ns=start_ns)
        claimed = self.claimed
        outcome, claimed_ms, entries = claimed.outcome, claimed.at_ms, claimed.entries
        if outcome == "refused":
            worker, attempt = self.worker, self.attempt
            settings = worker.settings
            deadline_ms = job_deadline_ms(settings.job_timeout_s, settings.heartbeat_s)
            raw_outcome, claimed_ms, entries = await persist(
                f"claiming {attempt.job}",
                lambda: worker.claim(
                    keys=[attempt.meta_key, jobs_key(worker.worker_id)],
                    args=[
                        attempt.job,
                        worker.worker_id,
                        attempt.stream_id,
                        deadline_ms,
                        claimed.claim,
                    ],
                ),
                settings,
            )
            outcome = raw_outcome.decode()
        if queue_span is not None:
            queue_span.end()
        if outcome == "gone":
            return None
        return outcome == "cancelled", int(claimed_ms), int(entries)

    async def generate(self, signal: StopSignal, claimed_ms: int) -> None:
        """Runs the backend to the stream's end; anything that goes wrong ends it with an error
        entry (`failure`), except losing the stream (`Fenced`) or giving it back."""
        try:
            end = await self.start_and_relay(signal, claimed_ms)
            await self.finish(end)
            self.log_finished(end)
        except (Fenced, HandedBack):
            raise
        except asyncio.CancelledError:
            stopped = GenerationFailed("the worker stopped (job timeout or shutdown)")
            await self.finish(failure(stopped))
            raise
        except Exception as exc:
            await self.finish(failure(exc))

    async def start_and_relay(self, signal: StopSignal, claimed_ms: int) -> Finished:
        if signal.stopped:
            raise signal.error()
        settings, writer = self.worker.settings, self.worker.writer
        asked = asyncio.get_running_loop().time()
        generation = await self.worker.backend.start(self.request)
        self.engine_counts_prompt = generation.ends_itself
        TOKENS.labels("prefill").inc(generation.prompt_tokens)
        # While generating, the stream outlives any job: its TTL is reset when the job ends.
        # Stored while the backend works on the prompt (an engine's request goes out at once);
        # the first token waits for it, and a refused one (`Fenced`) stops the job there.
        started = writer.append(
            self.attempt,
            Started(self.worker.worker_id, generation.prompt_tokens, claimed_ms, self.request.n),
            expire_s=int(settings.stream_ttl_s + settings.job_timeout_s),
        )
        started.add_done_callback(_retrieved)
        giving_back = GiveBack(self.worker, self.attempt, signal)
        try:
            return await self.relay(generation, signal, giving_back, started, asked)
        finally:
            giving_back.cancel()

    async def relay(
        self,
        generation: Generation,
        signal: StopSignal,
        giving_back: GiveBack,
        started: asyncio.Future[str],
        asked: float,
    ) -> Finished:
        """The backend's pieces, as text (and deltas), to the stream, until it ends, or every
        choice has met a stop string or `max_tokens`; how it finished."""
        answer = Answer(self.request, generation, self.worker.writer, self.attempt)
        # Closing the pieces ends the backend's work (an engine's request, a sequence) at once.
        async with (
            giving_back.failing(),
            signal.interrupting(),
            aclosing(generation.pieces) as pieces,
        ):
            async for piece in pieces:
                if self.first_piece_ms is None:
                    self.first_piece_ms = (asyncio.get_running_loop().time() - asked) * 1000
                    if await giving_back.stop():
                        raise HandedBack()
                    await started
                ended = await answer.take(piece)
                if signal.stopped:
                    raise signal.error()
                if ended:
                    break
        await started
        return await answer.end()

    async def finish(self, entry: Entry) -> None:
        """The terminal entry. It must land even if this task is being cancelled (arq's habit
        too), and even if Redis fails for a while: it is fenced, so it lands at most once. Its
        append also gives the metadata the stream's TTL, so a late resume gets a 404."""
        writer, settings = self.worker.writer, self.worker.settings

        def append() -> asyncio.Future[str]:
            return writer.append(self.attempt, entry, expire_s=settings.stream_ttl_s)

        await asyncio.shield(persist(f"ending {self.attempt.job}", append, settings))
        self.settled = True

    def log_finished(self, end: Finished) -> None:
        # The backend's own time to first token (an engine's, seen from here): what a client's
        # time to first token holds beyond it is sluice's.
        # One line a job (the API logs its start): a line costs more than it seems (shared/logs.py).
        first = "-" if self.first_piece_ms is None else f"{self.first_piece_ms:.1f}"
        log.info(
            "finished: %s, %d prompt and %d completion tokens, the first %s ms after the backend"
            " was asked",
            end.reason,
            end.prompt_tokens,
            end.completion_tokens,
            first,
        )
        TOKENS.labels("decode").inc(end.completion_tokens)
        if self.engine_counts_prompt:
            TOKENS.labels("prefill").inc(end.prompt_tokens)


def failure(exc: BaseException) -> Failed:
    """The terminal entry of a job that failed with `exc`."""
    match exc:
        case EntriesLost():
            log.warning("%s", exc)
            return Failed(RedisFailover(LOST_IN_FAILOVER).body())
        case TextLost():
            log.warning("%s", exc)
            return Failed(GenerationFailed("the worker could not store the answer").body())
        case SluiceError():
            # Its status too (an engine's 4xx, a prompt too long), where a relayed error's own
            # (500) would misstate it to a non-streaming request.
            status = exc.status if exc.status != RemoteError.status else None
            return Failed(exc.body(), status)
        case BackendError():
            log.warning("%s", exc)
            return Failed(GenerationFailed(str(exc)).body())
    log.error("the job failed", exc_info=exc)
    return Failed(GenerationFailed("the worker failed while generating").body())


async def persist(what: str, call: Callable[[], Awaitable[T]], settings: Settings) -> T:
    """`call()`, tried again with backoff while Redis fails, for up to `redis_retry_s`. Only
    for writes whose repetition is harmless: a fenced append lands at most once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.redis_retry_s
    backoff = 0.05
    while True:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            if loop.time() + backoff > deadline:
                raise
            log.warning("%s failed (%s); trying again in %.2f s", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


def _retrieved(future: asyncio.Future[str]) -> None:
    """A job that fails before its first token never awaits its `Started` append: its outcome
    is taken here, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
