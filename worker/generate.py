"""The job: run the backend, append its text to the job's stream, then one terminal entry."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from shared.errors import Cancelled, GenerationFailed, SluiceError
from shared.protocol import (
    Entry,
    Failed,
    Finished,
    FinishReason,
    Started,
    cancel_key,
    meta_key,
    stream_key,
)
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import Backend, BackendError
from worker.control import JobControl, StopSignal
from worker.text import TextAssembler
from worker.writer import StreamWriter

log = logging.getLogger("sluice.worker")

# Records which worker runs the stream's current attempt, for the API's liveness checks.
# Returns 0, and the job does nothing, if the stream is gone or this attempt was replaced;
# 2 if the stream was cancelled before the job started.
CLAIM_SCRIPT = """
if redis.call('HGET', KEYS[1], 'job') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 1
"""


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    job = GenerationJob.model_validate(payload)
    claim = await ctx["claim"](
        keys=[meta_key(job.stream_id), cancel_key(job.stream_id)],
        args=[ctx["job_id"], ctx["worker_id"]],
    )
    if not claim:
        log.info("job %s is no longer wanted; skipped", ctx["job_id"])
        return
    control: JobControl = ctx["control"]
    signal = control.watch(job.stream_id)
    if claim == 2:
        signal.stop("cancelled by request")
    try:
        await _generate(ctx, job, signal)
    finally:
        control.release(job.stream_id)


async def _generate(ctx: dict[str, Any], job: GenerationJob, signal: StopSignal) -> None:
    settings: Settings = ctx["settings"]
    backend: Backend = ctx["backend"]
    writer: StreamWriter = ctx["writer"]
    key = stream_key(job.stream_id)

    async def finish(entry: Entry) -> None:
        # The terminal entry must land even if this task is being cancelled (arq's habit too).
        await asyncio.shield(writer.append(key, entry, expire_s=settings.stream_ttl_s))
        # The stream's metadata goes when the stream does, so a late resume gets a clean 404.
        await asyncio.shield(ctx["redis"].expire(meta_key(job.stream_id), settings.stream_ttl_s))

    try:
        if signal.stopped:
            raise Cancelled(signal.reason)
        generation = await backend.start(job)
        # While generating, the stream outlives any job: its TTL is reset when the job ends.
        await writer.append(
            key,
            Started(ctx["worker_id"], generation.prompt_tokens),
            expire_s=int(settings.stream_ttl_s + settings.job_timeout_s),
        )
        text = TextAssembler(job.stop)
        produced = 0
        reason: FinishReason = "stop"
        async with aclosing(generation.pieces) as pieces:
            async for piece in pieces:
                produced += 1
                if out := text.feed(piece):
                    await writer.send(key, out)
                if signal.stopped:
                    raise Cancelled(signal.reason)
                if text.stopped:
                    break
                if produced >= job.max_tokens:
                    reason = "length"
                    break
        if tail := text.flush():
            await writer.send(key, tail)
        await finish(Finished(reason, generation.prompt_tokens, produced))
    except SluiceError as exc:
        await finish(Failed(exc.body()))
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
