"""Redis as it is deployed for real (issue 13): a password, TLS with a private CA and client
certificates, job records that cannot run code, and errors that do not show where Redis is."""

from __future__ import annotations

import asyncio
import pathlib
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from arq.jobs import serialize_job

from shared.arq_internals import ClaimingWorker, job_deserializer, job_key, job_serializer
from shared.protocol import JOB_FUNCTION, queue_name, waiting_key, wake_channel
from shared.redis_url import RedisURLError, arq_redis_settings
from tests.prereqs import require
from tests.procs import (
    NO_PERSISTENCE,
    Proc,
    RedisServer,
    Stack,
    eventually,
    free_port,
    sluice_env,
    start_api,
    start_stack,
    wait_until,
)
from tests.sse import SSEResult, stream
from tests.tls import Certificates, make_certificates

# Every character a URL gives a meaning to: in SLUICE_REDIS_URL the password is percent-encoded.
PASSWORD = "p@ss/w:rd?#%+ ="
SECRET = "s3cret-in-the-url"
SYNTHETIC = {"backend": "synthetic", "synthetic_tokens_per_s": "400"}


def secured_redis(name: str, url: str, *options: str) -> Proc:
    """A redis-server with `options` (a password, TLS), once a client at `url` gets PONG."""
    server = require("redis-server")
    proc = Proc(name, [server, "--bind", "127.0.0.1", *NO_PERSISTENCE, *options]).start()

    def answers() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.log_tail()}")
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    wait_until(answers, 10, name)
    return proc


async def streams_to_done(stack: Stack, prompt: str) -> SSEResult:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        result = await stream(client, {"prompt": prompt, "stream": True, "max_tokens": 5})
    assert result.status == 200
    assert result.errors == []
    assert result.text
    assert result.events[-1].data == "[DONE]"
    return result


@pytest.fixture(scope="module")
def password_redis() -> Iterator[str]:
    """A redis-server that refuses clients without the password; yields its URL."""
    port = free_port()
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    proc = secured_redis(
        f"redis-password-{port}", url, "--port", str(port), "--requirepass", PASSWORD
    )
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def password_stack(password_redis: str) -> Iterator[Stack]:
    stack = start_stack("redis-password", password_redis, 1, **SYNTHETIC)
    yield stack
    stack.stop()


async def test_api_and_worker_serve_a_stream_from_a_password_protected_redis(
    password_redis: str, password_stack: Stack
) -> None:
    without_password = password_redis.replace(f":{quote(PASSWORD, safe='')}@", "")
    with (
        redis.Redis.from_url(without_password) as anonymous,
        pytest.raises(redis.AuthenticationError),
    ):
        anonymous.ping()

    await streams_to_done(password_stack, "hello through a password")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A private CA, a server certificate and a client certificate, made for this run."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_redis(certs: Certificates, url: str, port: int, *, client_certificates: bool) -> Proc:
    """A redis-server that speaks TLS only (`--port 0`), optionally requiring a client
    certificate signed by the CA."""
    return secured_redis(
        f"redis-tls-{port}",
        url,
        *("--port", "0", "--tls-port", str(port)),
        *("--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)),
        *("--tls-ca-cert-file", str(certs.ca)),
        *("--tls-auth-clients", "yes" if client_certificates else "no"),
    )


@pytest.mark.parametrize("client_certificates", [False, True], ids=["ca", "client-certificate"])
async def test_api_and_worker_serve_a_stream_over_tls_verified_against_a_private_ca(
    certificates: Certificates, client_certificates: bool
) -> None:
    port = free_port()
    base = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificates.ca}"
    # The server's name is checked too: its certificate is for 127.0.0.1.
    url = f"{base}&ssl_check_hostname=true&ssl_cert_reqs=required"
    if client_certificates:
        url += f"&ssl_certfile={certificates.client_cert}&ssl_keyfile={certificates.client_key}"
    server = tls_redis(certificates, url, port, client_certificates=client_certificates)
    try:
        refused = base if client_certificates else f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(refused, socket_connect_timeout=1, socket_timeout=5)
        with client, pytest.raises(redis.ConnectionError):
            client.ping()

        stack = start_stack(f"redis-tls-{port}", url, 1, **SYNTHETIC)
        try:
            await streams_to_done(stack, "hello over TLS")
        finally:
            stack.stop()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("url", "settings"),
    [
        (f"redis://:{quote(PASSWORD, safe='')}@h:1/3", {"password": PASSWORD, "database": 3}),
        ("redis://u:p@h:1/0", {"username": "u", "password": "p", "ssl": False}),
        (
            "rediss://h:2/0?ssl_ca_certs=/ca.crt&ssl_certfile=/c.crt&ssl_keyfile=/c.key"
            "&ssl_cert_reqs=optional&ssl_check_hostname=true",
            {
                "ssl": True,
                "ssl_ca_certs": "/ca.crt",
                "ssl_certfile": "/c.crt",
                "ssl_keyfile": "/c.key",
                "ssl_cert_reqs": "optional",
                "ssl_check_hostname": True,
            },
        ),
        ("unix:///run/redis.sock?db=2", {"unix_socket_path": "/run/redis.sock", "database": 2}),
    ],
    ids=["encoded password", "user and password", "tls", "unix socket"],
)
def test_worker_reads_the_redis_url_as_the_api_does(url: str, settings: dict[str, Any]) -> None:
    parsed = arq_redis_settings(url)

    assert {name: getattr(parsed, name) for name in settings} == settings


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"redis://:{SECRET}@h:1/0?ssl_ca_certs=/ca.crt", "rediss://"),
        (f"redis://:{SECRET}@h:1/0?health_check_interval=5", "health_check_interval"),
        (f"http://:{SECRET}@h:1/0", "redis://"),
    ],
    ids=["tls option without tls", "option arq cannot carry", "not redis"],
)
def test_worker_refuses_a_redis_url_it_would_read_differently_without_quoting_it(
    url: str, named: str
) -> None:
    with pytest.raises(RedisURLError) as refused:
        arq_redis_settings(url)

    assert named in str(refused.value)
    assert SECRET not in str(refused.value)


class CreatesFile:
    """Unpickled, creates a file: what any pickle in Redis could do, with any code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return pathlib.Path.touch, (self.path,)


def pickled_job(path: Path) -> bytes:
    """A job record as arq writes it by default (pickle) whose unpickling creates `path`."""
    return serialize_job(JOB_FUNCTION, (CreatesFile(path),), {}, None, 0)


def test_a_pickled_job_record_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The control for the test below: the payload is live."""
    path = tmp_path / "unpickled"
    pickle.loads(pickled_job(path))

    assert path.exists()


async def test_worker_does_not_unpickle_a_job_written_into_redis_and_serves_the_next(
    password_stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "pwned"
    arq_job_id = f"{uuid.uuid4().hex}.1"
    with redis.Redis.from_url(password_stack.redis_url) as r:
        seconds, micros = r.time()
        r.psetex(job_key(arq_job_id), 60_000, pickled_job(path))
        now_ms = seconds * 1000 + micros // 1000
        r.zadd(queue_name("synthetic"), {arq_job_id: now_ms})
        r.zadd(waiting_key("synthetic"), {arq_job_id: now_ms})
        r.publish(wake_channel("synthetic"), arq_job_id)
        # The worker has taken the job (and failed it) when arq's record of it is gone.
        await eventually(lambda: not r.exists(job_key(arq_job_id)), "the worker to take the job")
        assert r.zscore(queue_name("synthetic"), arq_job_id) is None

    assert not path.exists()
    assert all(worker.alive() for worker in password_stack.workers)
    await streams_to_done(password_stack, "after the pickle")


def test_job_records_are_json_and_read_back() -> None:
    data = {"f": JOB_FUNCTION, "a": [{"stream_id": "s"}], "k": {}, "t": None, "et": 1}
    record = job_serializer(data)

    assert record.startswith(b"{")
    assert job_deserializer(record) == data
    # arq records a failed job's exception as its result
    assert job_deserializer(job_serializer({"r": ValueError("boom")})) == {"r": "ValueError: boom"}
    with pytest.raises(TypeError):
        job_serializer({"r": object()})
    with pytest.raises(ValueError, match="JSON object"):
        job_deserializer(b"[1]")


@pytest.mark.parametrize("option", ["job_serializer", "job_deserializer"])
def test_claiming_worker_refuses_a_job_serializer_other_than_json(option: str) -> None:
    with pytest.raises(ValueError, match="JSON"):
        ClaimingWorker(
            functions=[],
            waiting_key="waiting",
            orphan_after_ms=3000,
            worker_id="w",
            attempts_key="attempts",
            job_deadline_ms=60_000,
            **{option: pickle.loads},
        )


def assert_names_no_redis_address(text: str, host: str, port: int) -> None:
    assert host not in text
    assert str(port) not in text


async def test_with_redis_unreachable_the_503_names_no_host_or_port() -> None:
    redis_port = free_port()  # nothing listens there
    env = sluice_env(f"redis://localhost:{redis_port}/0", free_port(), **SYNTHETIC)
    api, url = start_api("redis-unreachable", env)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post(
                "/v1/chat/completions", json={"prompt": "hi", "stream": True}
            )
    finally:
        api.stop()

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "redis_unavailable"
    assert_names_no_redis_address(response.text, "localhost", redis_port)
    assert str(redis_port) in api.log_tail(200)  # the detail is for the operator


async def test_redis_lost_mid_stream_ends_it_naming_no_host_or_port() -> None:
    own = RedisServer().start()
    stack = start_stack(
        f"redis-lost-{own.port}", f"redis://localhost:{own.port}/0", 1, synthetic_tokens_per_s="20",
        backend="synthetic",
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
            open_stream = asyncio.create_task(stream(client, {"prompt": "cut", "stream": True}))
            with own.client() as r:
                await eventually(
                    lambda: any(r.xlen(k) >= 2 for k in r.scan_iter("sluice:stream:*")),
                    "the stream to be under way",
                )
            own.stop()
            cut = await open_stream
            refused = await client.post(
                "/v1/chat/completions", json={"prompt": "x", "stream": True}
            )
    finally:
        restarted = RedisServer(own.port).start()  # so that the worker can drain and stop
        stack.stop()
        restarted.stop()
        own.stop()

    assert cut.errors[-1]["code"] == "redis_unavailable"
    assert refused.status_code == 503
    for text in (str(cut.errors), refused.text):
        assert_names_no_redis_address(text, "localhost", own.port)
