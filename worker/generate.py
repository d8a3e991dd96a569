"""The job: run the backend, append its text to the job's stream, then one terminal entry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from redis.exceptions import RedisError

from shared import tracing
from shared.errors import GenerationFailed, RemoteError, SluiceError
from shared.logs import bind
from shared.protocol import (
    MAX_ATTEMPTS,
    REDIS_NOW_LUA,
    Attempt,
    Entry,
    Failed,
    Finished,
    FinishReason,
    Started,
    meta_key,
    serving_key,
    stream_key,
    worker_ttl_ms,
)
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import Backend, BackendError
from worker.control import HandedBack, JobControl, StopSignal
from worker.metrics import TOKENS
from worker.text import TextAssembler
from worker.writer import Fenced, StreamWriter, TextLost

log = logging.getLogger("sluice.worker")

# Records which worker runs the stream's current attempt, and since when (Redis's clock), for
# the supervisor. Returns {0}, and the job does nothing, if the stream is gone or ended or this
# attempt was replaced; {2, now} if the stream was cancelled before the job started; else
# {1, now}. Run again after a failure, it changes nothing but the time.
# KEYS: metadata. ARGV: job id, worker id.
CLAIM_SCRIPT = (
    REDIS_NOW_LUA
    + """
local current = redis.call('HMGET', KEYS[1], 'job', 'ended', 'cancel')
if current[1] ~= ARGV[1] or current[2] then return {0} end
local now = redis_now_ms()
redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'started', now)
if current[3] then return {2, now} end
return {1, now}
"""
)

# Gives a job whose backend cannot reach its engine back to the queue, if another worker serves
# its model now and the job may be tried again (no token written, attempts left): the stream's
# worker is marked as one that is gone, and the supervisor retries the job as it retries a lost
# worker's, fenced. Returns 1 if given back.
# KEYS: metadata, stream, the model's serving set. ARGV: job id, worker id, worker TTL (ms),
# max attempts.
HAND_BACK_SCRIPT = (
    REDIS_NOW_LUA
    + """
local current = redis.call('HMGET', KEYS[1], 'job', 'ended', 'worker')
if current[1] ~= ARGV[1] or current[2] or current[3] ~= ARGV[2] then return 0 end
if tonumber(string.match(ARGV[1], '%.(%d+)$')) >= tonumber(ARGV[4]) then return 0 end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if newest and newest[2][1] ~= 's' then return 0 end
local serving = redis.call('ZRANGEBYSCORE', KEYS[3], redis_now_ms() - tonumber(ARGV[3]), '+inf')
for _, worker in ipairs(serving) do
  if worker ~= ARGV[2] then
    redis.call('HSET', KEYS[1], 'worker', ARGV[2] .. ' (gave the job back)')
    return 1
  end
end
return 0
"""
)
HAND_BACK_CHECK_S = 0.25
"""How often a job waiting for its first piece looks whether it should be given back."""
MAX_BACKOFF_S = 2.0

T = TypeVar("T")


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


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    job = GenerationJob.model_validate(payload)
    bind(job.stream_id, job.key_name)
    attempt = Attempt(job.stream_id, ctx["job_id"])
    parent = tracing.parent_of(job.trace)
    enqueued: datetime = ctx["enqueue_time"]
    queue_span = tracing.start_span(
        "queue", parent=parent, start_ns=int(enqueued.timestamp() * 1_000_000_000)
    )
    claim, *claimed_ms = await persist(
        f"claiming {attempt.job}",
        lambda: ctx["claim"](keys=[attempt.meta_key], args=[attempt.job, ctx["worker_id"]]),
        ctx["settings"],
    )
    if queue_span is not None:
        queue_span.end()
    if not claim:
        log.info("job %s is no longer wanted; skipped", attempt.job)
        return
    span = tracing.start_span("generate", parent=parent)
    if span is not None:
        span.set_attribute("sluice.worker", ctx["worker_id"])
    control: JobControl = ctx["control"]
    signal = control.watch(job.stream_id, attempt.job)
    if claim == 2:
        signal.stop("cancelled")
    try:
        await _generate(ctx, job, attempt, signal, claimed_ms[0])
    except Fenced:
        # The supervisor ended the stream or gave it to a newer attempt while this one was
        # presumed dead (a frozen process, a long pause): it has nothing more to say.
        log.warning("job %s lost its stream to the supervisor; stopped", attempt.job)
    except HandedBack:
        log.warning(
            "job %s given back: its engine does not answer, another worker's does", attempt.job
        )
    finally:
        control.release(job.stream_id)
        if span is not None:
            span.end()


async def _generate(
    ctx: dict[str, Any], job: GenerationJob, attempt: Attempt, signal: StopSignal, claimed_ms: int
) -> None:
    settings: Settings = ctx["settings"]
    backend: Backend = ctx["backend"]
    writer: StreamWriter = ctx["writer"]

    async def finish(entry: Entry) -> None:
        # The terminal entry must land even if this task is being cancelled (arq's habit too),
        # and even if Redis fails for a while: it is fenced, so it lands at most once. Its
        # append also gives the metadata the stream's TTL, so a late resume gets a 404.
        def append() -> asyncio.Future[str]:
            return writer.append(attempt, entry, expire_s=settings.stream_ttl_s)

        await asyncio.shield(persist(f"ending {attempt.job}", append, settings))

    giving_back: _GiveBack | None = None
    try:
        if signal.stopped:
            raise signal.error()
        asked = asyncio.get_running_loop().time()
        generation = await backend.start(job)
        log.info("generating: %d prompt tokens", generation.prompt_tokens)
        TOKENS.labels("prefill").inc(generation.prompt_tokens)
        # While generating, the stream outlives any job: its TTL is reset when the job ends.
        # Stored while the backend works on the prompt (an engine's request goes out at once);
        # the first token waits for it, and a refused one (`Fenced`) stops the job there.
        written = writer.append(
            attempt,
            Started(ctx["worker_id"], generation.prompt_tokens, claimed_ms),
            expire_s=int(settings.stream_ttl_s + settings.job_timeout_s),
        )
        written.add_done_callback(_retrieved)
        started: asyncio.Future[str] | None = written
        giving_back = _GiveBack(ctx, job, attempt, signal)
        text = TextAssembler(job.stop)
        produced = 0
        first_piece_ms: float | None = None
        reason: FinishReason = "stop"
        # Closing the pieces ends the backend's work (an engine's request, a sequence) at once.
        async with (
            giving_back.failing(),
            signal.interrupting(),
            aclosing(generation.pieces) as pieces,
        ):
            async for piece in pieces:
                if first_piece_ms is None:
                    first_piece_ms = (asyncio.get_running_loop().time() - asked) * 1000
                    if await giving_back.stop():
                        raise HandedBack()
                if started is not None:
                    await started
                    started = None
                produced += 1
                if out := text.feed(piece):
                    await writer.send(attempt, out)
                if signal.stopped:
                    raise signal.error()
                if text.stopped:
                    break
                if produced >= job.max_tokens and not generation.ends_itself:
                    reason = "length"
                    break
        if started is not None:
            await started
        if tail := text.flush():
            await writer.send(attempt, tail)
        end = generation.finished or Finished(reason, generation.prompt_tokens, produced)
        await finish(end)
        # The backend's own time to first token (an engine's, seen from here): what a client's
        # time to first token holds beyond it is sluice's.
        log.info(
            "finished: %s, %d tokens, the first %s ms after the backend was asked",
            end.reason,
            end.completion_tokens,
            "-" if first_piece_ms is None else f"{first_piece_ms:.1f}",
        )
        TOKENS.labels("decode").inc(end.completion_tokens)
        if generation.ends_itself:  # its engine counts the prompt, and says so only now
            TOKENS.labels("prefill").inc(end.prompt_tokens)
    except (Fenced, HandedBack):
        raise
    except TextLost as exc:
        log.warning("job %s: %s", job.stream_id, exc)
        await finish(Failed(GenerationFailed("the worker could not store the answer").body()))
    except SluiceError as exc:
        # Its status too (an engine's 4xx, a prompt too long), where a relayed error's own (500)
        # would misstate it to a non-streaming request.
        status = exc.status if exc.status != RemoteError.status else None
        await finish(Failed(exc.body(), status))
    except BackendError as exc:
        log.warning("job %s: %s", job.stream_id, exc)
        await finish(Failed(GenerationFailed(str(exc)).body()))
    except asyncio.CancelledError:
        await finish(
            Failed(GenerationFailed("the worker stopped (job timeout or shutdown)").body())
        )
        raise
    except Exception:
        log.exception("job %s failed", job.stream_id)
        await finish(Failed(GenerationFailed("the worker failed while generating").body()))
    finally:
        if giving_back is not None:
            giving_back.cancel()


class _GiveBack:
    """While a job waits for its first piece: once its backend cannot reach its engine, looks
    every `HAND_BACK_CHECK_S` whether to give the job back (`HAND_BACK_SCRIPT`), and if it did,
    stops the job (`HandedBack`). A backend that fails before the first piece, its engine
    unavailable (silent past `SLUICE_UPSTREAM_TIMEOUT_S`), gets one more look (`failing`)."""

    def __init__(
        self, ctx: dict[str, Any], job: GenerationJob, attempt: Attempt, signal: StopSignal
    ) -> None:
        self._signal = signal
        self._check: asyncio.Future[bool] | None = None
        self._task = asyncio.create_task(self._watch(ctx, job, attempt))
        self._args = ctx, job, attempt
        self._first_piece = False

    @asynccontextmanager
    async def failing(self) -> AsyncIterator[None]:
        """Around the job's pieces: the backend's error before the first piece, with its engine
        unavailable, becomes `HandedBack` if the job could be given back."""
        try:
            yield
        except SluiceError:
            if self._first_piece:
                raise
            self._task.cancel()
            if self._check is not None and await self._check:  # a look under way gave it back
                raise HandedBack() from None
            ctx, job, attempt = self._args
            if self._signal.stopped or ctx["backend"].available:
                raise
            if not await self._give_back(ctx, job, attempt):
                raise
            raise HandedBack() from None

    async def _watch(self, ctx: dict[str, Any], job: GenerationJob, attempt: Attempt) -> None:
        backend: Backend = ctx["backend"]
        while True:
            await asyncio.sleep(HAND_BACK_CHECK_S)
            if backend.available:
                continue
            self._check = asyncio.ensure_future(self._give_back(ctx, job, attempt))
            if await asyncio.shield(self._check):
                self._signal.hand_back()
                return

    async def _give_back(self, ctx: dict[str, Any], job: GenerationJob, attempt: Attempt) -> bool:
        settings: Settings = ctx["settings"]
        try:
            given = await ctx["hand_back"](
                keys=[
                    meta_key(job.stream_id),
                    stream_key(job.stream_id),
                    serving_key(ctx["backend"].model),
                ],
                args=[
                    attempt.job,
                    ctx["worker_id"],
                    worker_ttl_ms(settings.heartbeat_s),
                    MAX_ATTEMPTS,
                ],
            )
        except (RedisError, OSError) as exc:
            log.warning("job %s: could not look whether to give it back: %s", attempt.job, exc)
            return False
        return bool(given)

    async def stop(self) -> bool:
        """The first piece came: no giving back from now on. True if the job was given back
        all the same (a check that was under way decided so): it must stop."""
        self._first_piece = True
        self._task.cancel()
        return self._check is not None and bool(await self._check)

    def cancel(self) -> None:
        self._task.cancel()


def _retrieved(future: asyncio.Future[str]) -> None:
    """A job that fails before its first token never awaits its `Started` append: its outcome
    is taken here, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
