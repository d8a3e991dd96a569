"""Fixtures: a private redis-server, and stacks of real `sluice api` / `sluice worker` processes.

Each stack uses its own Redis database, so their queues and workers never mix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from arq.connections import ArqRedis

from tests.prereqs import pytest_sessionfinish  # noqa: F401 (the hook: in CI a skip fails)
from tests.procs import RedisServer, Stack, start_stack
from tests.upstreams import SKIP_ENV, LlamaServer
from tests.upstreams import llama_server_binary as build_llama_server

SYNTHETIC_RATE = "400"  # tokens/s: fast enough for many tests, slow enough to interleave


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[ArqRedis]:
    """An asyncio client on database 0, where tests use keys of their own (no stack runs)."""
    client = ArqRedis.from_url(redis_server.url())
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def synthetic(redis_server: RedisServer) -> Iterator[Stack]:
    """API + two synthetic workers."""
    stack = start_stack(
        "synthetic",
        redis_server.url(1),
        2,
        backend="synthetic",
        synthetic_tokens_per_s=SYNTHETIC_RATE,
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def model(redis_server: RedisServer) -> Iterator[Stack]:
    """API + one worker on the real model (SmolLM2-135M through llama.cpp)."""
    stack = start_stack("model", redis_server.url(2), 1, backend="llama")
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def model_name(model: Stack) -> str:
    """The real model's name, as `/v1/models` lists it."""
    name: str = httpx.get(f"{model.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    return name


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """llama.cpp's own server, built once by deploy/llama-server.sh (minutes, then cached)."""
    binary = build_llama_server()
    if binary is None:
        pytest.skip(f"{SKIP_ENV}=1 and no llama-server is built (`make llama-server` builds it)")
    return binary


@pytest.fixture(scope="session")
def llama_server(llama_server_binary: Path) -> Iterator[LlamaServer]:
    """llama-server on the bundled GGUF, 4 slots: a real engine for the `openai` backend."""
    server = LlamaServer(llama_server_binary).start()
    yield server
    server.stop()


@pytest.fixture
async def client(synthetic: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=synthetic.base_url, timeout=30) as c:
        yield c


@pytest.fixture
async def model_client(model: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=model.base_url, timeout=120) as c:
        yield c
