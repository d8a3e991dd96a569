"""Giving a job back when its backend cannot reach its engine, for a worker whose engine answers.

While a job waits for its first piece, once its backend is unavailable, it looks every
`HAND_BACK_CHECK_S` whether to give the job back (shared/lua/hand_back.lua) and, if it did,
stops the job (`HandedBack`). A backend that fails before the first piece with its engine
unavailable (silent past `SLUICE_UPSTREAM_TIMEOUT_S`, say) gets one more look (`failing`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from shared.errors import SluiceError
from shared.protocol import MAX_ATTEMPTS, Attempt, jobs_key, serving_key, worker_ttl_ms
from worker.context import WorkerContext
from worker.control import HandedBack, StopSignal

log = logging.getLogger("sluice.worker")

HAND_BACK_CHECK_S = 0.25
"""How often a job waiting for its first piece looks whether it should be given back."""


class GiveBack:
    def __init__(self, worker: WorkerContext, attempt: Attempt, signal: StopSignal) -> None:
        self._worker = worker
        self._attempt = attempt
        self._signal = signal
        self._check: asyncio.Future[bool] | None = None
        self._first_piece = False
        self._task = asyncio.create_task(self._watch())

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
            if self._signal.stopped or self._worker.backend.available:
                raise
            if not await self._give_back():
                raise
            raise HandedBack() from None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HAND_BACK_CHECK_S)
            if self._worker.backend.available:
                continue
            self._check = asyncio.ensure_future(self._give_back())
            if await asyncio.shield(self._check):
                self._signal.hand_back()
                return

    async def _give_back(self) -> bool:
        worker, attempt = self._worker, self._attempt
        try:
            given = await worker.hand_back(
                keys=[
                    attempt.meta_key,
                    attempt.stream_key,
                    serving_key(worker.backend.model),
                    jobs_key(worker.worker_id),
                ],
                args=[
                    attempt.job,
                    worker.worker_id,
                    worker_ttl_ms(worker.settings.heartbeat_s),
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
