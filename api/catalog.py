"""The models a deployment serves, as its workers announce them, and which one a request is for.

Workers announce their model with every heartbeat (`MODELS_KEY`, `serving_key`); the API has no
model file and no model setting of its own. Each API process reads the table every `REFRESH_S`
in a loop of its own (`refresh_forever`), so routing a request waits for no round trip: a burst
of requests arriving after a quiet second had all waited for one read, which at 16 at once was
a third of what sluice added to their first token. Should the loop fail (Redis away), a request
reads the table itself once it is `STALE_S` old. A request the table cannot route has it read
again first, by a read that begins after it looked (at most one such read every `RECHECK_S`), so
a model announced since the loop's last read is found.
The submit script (api/jobs.py) re-checks the routed model with Redis's own facts.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.errors import InvalidRequest, ModelNotFound, NoWorkers
from shared.protocol import MODELS_KEY, SERVING_PREFIX, worker_ttl_ms
from shared.scripts import lua
from shared.settings import Settings

REFRESH_S = 1.0
STALE_S = 5.0
RECHECK_S = 0.1


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    n_ctx: int | None
    """Tokens one sequence holds, as its workers last announced (None: unknown)."""
    workers: int
    """Live workers that could serve it when the table was read."""


def no_such_model(name: str) -> ModelNotFound:
    return ModelNotFound(f"The model `{name}` does not exist.", param="model")


class ModelCatalog:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(lua("models"))
        self._worker_ttl_ms = worker_ttl_ms(settings.heartbeat_s)
        self._default = settings.default_model
        self._retry_after_s = settings.retry_after_s
        self._models: dict[str, ServedModel] = {}
        self._read_at = float("-inf")
        """When the last read of the table began (time.monotonic())."""
        self._lock = asyncio.Lock()

    async def models(self, max_age_s: float = REFRESH_S) -> dict[str, ServedModel]:
        """Every model ever announced, read at most `max_age_s` ago (concurrent callers share
        one read)."""
        if time.monotonic() - self._read_at >= max_age_s:
            async with self._lock:
                if time.monotonic() - self._read_at >= max_age_s:
                    await self._read()
        return self._models

    async def refresh_forever(self) -> None:
        """Reads the table every `REFRESH_S`; a failed read raises (its supervisor shows and
        retries it)."""
        while True:
            await self.models()
            await asyncio.sleep(REFRESH_S)

    async def _read_after(self, moment: float) -> dict[str, ServedModel]:
        """The table as a read begun after `moment` found it (time.monotonic()): such reads come
        at most one every `RECHECK_S`, shared by concurrent callers."""
        async with self._lock:
            if self._read_at <= moment:
                await asyncio.sleep(max(0.0, self._read_at + RECHECK_S - time.monotonic()))
                await self._read()
        return self._models

    async def _read(self) -> None:
        began = time.monotonic()
        reply = await self._script(keys=[MODELS_KEY], args=[self._worker_ttl_ms, SERVING_PREFIX])
        models = {}
        for name, record, workers in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
            model = name.decode()
            models[model] = ServedModel(model, json.loads(record).get("n_ctx"), int(workers))
        self._models = models
        self._read_at = began

    async def served(self) -> list[ServedModel]:
        """The models some live worker serves now, by name (a fresh read)."""
        models = await self.models(max_age_s=0)
        return sorted((m for m in models.values() if m.workers), key=lambda m: m.name)

    async def route(self, requested: str | None) -> ServedModel:
        """The model a request is for: the one it names (404 if none was ever announced), else
        `SLUICE_DEFAULT_MODEL`, else the only model served (400 with several, 503 with none),
        or with none served, the only model ever announced."""
        try:
            return self._route(requested, await self.models(max_age_s=STALE_S))
        except (ModelNotFound, NoWorkers, InvalidRequest):
            return self._route(requested, await self._read_after(time.monotonic()))

    def _route(self, requested: str | None, models: dict[str, ServedModel]) -> ServedModel:
        if requested is not None:
            if requested not in models:
                raise no_such_model(requested)
            return models[requested]
        if self._default is not None:
            if self._default not in models:
                raise NoWorkers(
                    f"no worker has served the default model `{self._default}` yet",
                    retry_after_s=self._retry_after_s,
                )
            return models[self._default]
        served = sorted(name for name, m in models.items() if m.workers)
        if not served and len(models) == 1:
            # The only model there is: the submit script tells no worker from engines down.
            return next(iter(models.values()))
        if not served:
            raise NoWorkers(
                "no workers are available to serve this request", retry_after_s=self._retry_after_s
            )
        if len(served) > 1:
            raise InvalidRequest(
                f"this deployment serves several models ({', '.join(served)}) and has no "
                "default: name one in 'model'",
                param="model",
            )
        return models[served[0]]
