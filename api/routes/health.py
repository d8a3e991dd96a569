"""GET /health: the API is up; says whether Redis answers and how many workers are alive."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.deps import GatewayDep

router = APIRouter()


@router.get("/health")
async def health(gateway: GatewayDep) -> JSONResponse:
    try:
        workers = len(await gateway.queue.live_workers())
    except (RedisError, OSError):
        return JSONResponse({"status": "degraded", "redis": False, "workers": 0}, status_code=503)
    return JSONResponse({"status": "ok", "redis": True, "workers": workers})
