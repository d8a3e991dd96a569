"""A running `StreamHub` for tests that drive the API's stream reader in-process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from api.hub import StreamHub
from shared.loops import LoopGroup


@asynccontextmanager
async def running_hub(redis: Redis, **options: float) -> AsyncIterator[tuple[StreamHub, LoopGroup]]:
    """A hub whose loops run (supervised, as in the API) while the block runs."""
    hub = StreamHub(redis, **options)
    loops = LoopGroup(logging.getLogger("tests.hub"))
    hub.start(loops)
    try:
        yield hub, loops
    finally:
        await loops.stop()
        await hub.close()
