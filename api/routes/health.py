"""GET /health: the API is up; says whether Redis answers, how many workers are alive, and
whether this process's background loops run (a restarting loop makes it 503)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.deps import GatewayDep
from shared.loops import LoopState

router = APIRouter()


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    workers: int
    """Workers whose heartbeat is fresh."""
    loops: dict[str, LoopState]
    """This process's background loops: `running`, or `restarting` after a failure."""


@router.get(
    "/health",
    response_model=None,
    responses={
        200: {"model": Health, "description": "Redis answers and every loop runs"},
        503: {"model": Health, "description": "Redis does not answer, or a loop is restarting"},
    },
)
async def health(gateway: GatewayDep) -> JSONResponse:
    loops = gateway.loops.states()
    try:
        workers = len(await gateway.queue.live_workers())
    except (RedisError, OSError):
        down = Health(status="degraded", redis=False, workers=0, loops=loops)
        return JSONResponse(down.model_dump(), status_code=503)
    healthy = gateway.loops.healthy
    body = Health(status="ok" if healthy else "degraded", redis=True, workers=workers, loops=loops)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)
