"""GET /health: the API is up; says whether Redis answers, how many workers are alive, and
whether this process's background loops run (a restarting loop makes it 503)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.deps import GatewayDep

router = APIRouter()


@router.get("/health")
async def health(gateway: GatewayDep) -> JSONResponse:
    loops = gateway.loops.states()
    try:
        workers = len(await gateway.queue.live_workers())
    except (RedisError, OSError):
        body = {"status": "degraded", "redis": False, "workers": 0, "loops": loops}
        return JSONResponse(body, status_code=503)
    healthy = gateway.loops.healthy
    body = {"status": "ok" if healthy else "degraded", "redis": True, "workers": workers}
    return JSONResponse(body | {"loops": loops}, status_code=200 if healthy else 503)
