"""Probes and metrics: `GET /health` (liveness), `GET /ready` (readiness), `GET /metrics`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.deps import GatewayDep
from shared.loops import LoopState

router = APIRouter()


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    reasons: list[str]
    """Why not ready: `redis`, `no_workers`, or `loop:<name>` for a loop that is restarting."""
    redis: bool
    workers: int
    """Workers whose heartbeat is fresh."""
    loops: dict[str, LoopState]
    """This process's background loops: `running`, or `restarting` after a failure."""


@router.get("/health")
async def health() -> Liveness:
    """200 while the process serves (what a liveness probe asks: restart me only if not)."""
    return Liveness()


@router.get(
    "/ready",
    response_model=None,
    responses={
        200: {"model": Readiness, "description": "Redis answers, a worker lives, loops run"},
        503: {"model": Readiness, "description": "Not ready; `reasons` says why"},
    },
)
async def ready(gateway: GatewayDep) -> JSONResponse:
    """200 when this process can serve a request: Redis answers, at least one worker is alive
    and every background loop runs; otherwise 503 with the reasons."""
    loops = gateway.loops.states()
    reasons = [f"loop:{name}" for name, state in loops.items() if state != "running"]
    try:
        workers = len(await gateway.queue.live_workers())
        redis = True
    except (RedisError, OSError):
        workers, redis = 0, False
        reasons.insert(0, "redis")
    if redis and not workers:
        reasons.append("no_workers")
    body = Readiness(
        status="not_ready" if reasons else "ready",
        reasons=reasons,
        redis=redis,
        workers=workers,
        loops=loops,
    )
    return JSONResponse(body.model_dump(), status_code=503 if reasons else 200)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(gateway: GatewayDep) -> Response:
    """This process's metrics, and the deployment's queue and workers as Redis has them."""
    body, content_type = await gateway.state.exposition()
    return Response(body, media_type=content_type)
