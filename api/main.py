"""Builds the app. Resources live as long as the app: created in `lifespan`, closed after it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import ArqRedis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.auth import RATE_LIMIT_HEADERS, Authenticator
from api.body_limit import BodyLimit
from api.catalog import ModelCatalog
from api.errors import install_error_handlers
from api.gateway import STREAM_ID_HEADER, Gateway
from api.hub import StreamHub
from api.jobs import JobQueue
from api.metrics import DeploymentState, StampArrival
from api.openapi import SluiceAPI
from api.readers import ReaderRegistry
from api.replicas import ReplicaWait
from api.routes import chat, completions, health, models, playground, responses, streams
from api.supervisor import Supervisor
from shared.loops import LoopGroup
from shared.redis_url import api_pool, master_watch
from shared.settings import Settings

API_CLIENT_NAME = "sluice-api"  # how an API process's connections show in Redis's CLIENT LIST
log = logging.getLogger("sluice.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Built directly, not with arq's create_pool: that one retries for seconds at start-up,
        # and the API must start (and answer 503) even while Redis is down.
        # Blocking, and capped: a burst of requests waits for a connection instead of opening
        # one per request, so an API process holds at most `redis_max_connections`. With
        # Sentinels, to whichever node they name the master.
        redis = ArqRedis(connection_pool=api_pool(settings, client_name=API_CLIENT_NAME))
        hub = StreamHub(
            redis,
            read_timeout_s=settings.redis_socket_timeout_s,
            hold_s=settings.redis_failover_s if settings.redis_sentinels else 0,
            replicas=(
                ReplicaWait(redis, settings.redis_wait_ms)
                if settings.redis_sentinels and settings.redis_wait_ms
                else None
            ),
        )
        readers = ReaderRegistry(redis, period_s=settings.heartbeat_s, keep_s=60)
        queue = JobQueue(redis, settings)
        loops = LoopGroup(log)
        if sentinel_pool := master_watch(redis):
            loops.start("redis-master", sentinel_pool.watch_master)
        hub.start(loops)
        loops.start("readers", readers.refresh_forever)
        loops.start("supervisor", Supervisor(redis, queue, settings).run)
        state = DeploymentState(redis, settings.heartbeat_s)
        models = ModelCatalog(redis, settings)
        loops.start("models", models.refresh_forever)
        app.state.gateway = Gateway(settings, queue, hub, readers, loops, state, models)
        app.state.authenticator = Authenticator(redis, settings)
        try:
            yield
        finally:
            await loops.stop()
            await hub.close()
            await redis.aclose(close_connection_pool=True)

    app = SluiceAPI(title="sluice", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if origins := settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            # A page reads the stream id to resume, and the limits to pace itself.
            expose_headers=[STREAM_ID_HEADER, "Retry-After", *RATE_LIMIT_HEADERS],
            max_age=600,
        )
    app.add_middleware(StampArrival)  # the outermost: added last
    for module in (chat, completions, models, streams, responses, health):
        app.include_router(module.router)
    if settings.playground:
        app.include_router(playground.router)
    return app
