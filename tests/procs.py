"""Real processes for tests: a private redis-server, `sluice api`, `sluice worker`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import redis

from tests.prereqs import missing, require
from tests.tls import Certificates

T = TypeVar("T")
LOGS = Path(__file__).parent / ".logs"
NO_PERSISTENCE = ["--save", "", "--appendonly", "no"]
DATABASES = 64
"""Databases of the tests' redis-server: 0-15 for fixtures that name theirs, the rest for
stacks made per test (tests/faults)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


async def answered(
    request: Callable[[], Awaitable[httpx.Response]], within_s: float = 10
) -> httpx.Response:
    """`request` again until it answers 200, for up to `within_s`."""
    deadline = time.monotonic() + within_s
    while (response := await request()).status_code != 200:
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.2)
    return response


async def eventually(check: Callable[[], T], what: str) -> T:
    """Poll `check` (a Redis read: no event to wait on) until it is truthy, for up to 10 s."""
    for _ in range(200):
        if result := check():
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


_starts: Counter[str] = Counter()
"""Processes started by this test run, by name."""


def new_log(name: str) -> Path:
    """An empty log file that no other process of this run writes: `<name>.log` for the first
    process of that name, `<name>.<n>.log` for the n-th (stacks reuse names, replicas share
    them). A line left by an earlier run or process can never satisfy a test reading it."""
    _starts[name] += 1
    n = _starts[name]
    path = LOGS / (f"{name}.log" if n == 1 else f"{name}.{n}.log")
    LOGS.mkdir(exist_ok=True)
    path.write_bytes(b"")
    return path


@dataclass
class Proc:
    """A child process whose output goes to a log file of its own under tests/.logs/."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    """Set by `start`: this start's log alone."""

    def start(self) -> Proc:
        self.log_path = new_log(self.name)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL if it will not go; returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def log_text(self) -> str:
        """Everything this process has written."""
        assert self.log_path is not None, f"{self.name} was never started"
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class RedisServer(Proc):
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        server = require("redis-server")
        super().__init__(
            f"redis-{self.port}",
            [
                *(server, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--databases", str(DATABASES), *NO_PERSISTENCE),
            ],
        )

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def fresh_url(self, db: int) -> str:
        """The URL of database `db`, emptied first: per-test stacks reuse databases (the fault
        tests' wrap round), and a stack must not inherit another's workers, streams or lease."""
        with self.client(db) as client:
            client.flushdb()
        return self.url(db)

    def start(self) -> RedisServer:
        super().start()
        wait_until(self._answers, 10, "redis-server")
        return self

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


def sluice(command: str, name: str, env: dict[str, str], clock_offset: str | None = None) -> Proc:
    """`sluice <command>`; with `clock_offset` (faketime's, e.g. "+5s"), on a shifted wall clock."""
    if clock_offset is not None:
        # libfaketime preloaded into sluice itself, not the `faketime` command: that one forks,
        # so signals sent to it (a stop, SIGSTOP, SIGKILL) would miss sluice and orphan it.
        env = env | {
            "LD_PRELOAD": str(faketime_library()),
            "FAKETIME": clock_offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
    return Proc(name, [sys.executable, "-m", "sluice", command], env).start()


def faketime_library() -> Path:
    """Debian's libfaketime (package faketime)."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        missing("libfaketime")
    return found[0]


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url`, with any status."""
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def sluice_env(redis_url: str, port: int, **settings: str) -> dict[str, str]:
    """`SLUICE_*` variables: Redis, the API's port on loopback, and `settings` by field name."""
    env = {"SLUICE_REDIS_URL": redis_url, "SLUICE_PORT": str(port), "SLUICE_HOST": "127.0.0.1"}
    return env | {f"SLUICE_{k.upper()}": v for k, v in settings.items()}


def start_api(name: str, env: dict[str, str], clock_offset: str | None = None) -> tuple[Proc, str]:
    """`sluice api` with `env`, once it answers; returns the process and its URL."""
    api = sluice("api", name, env, clock_offset)
    url = f"http://127.0.0.1:{env['SLUICE_PORT']}"
    wait_until(lambda: answers(f"{url}/health"), 30, name)
    return api, url


@dataclass
class Stack:
    """An API process and its workers, sharing one Redis database."""

    redis_url: str
    api: Proc
    workers: list[Proc]
    port: int
    env: dict[str, str]
    replicas: list[Proc] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_replica(self) -> tuple[Proc, str]:
        """Another API process on the same Redis (stopped with the stack)."""
        replica, url = start_api(
            f"{self.api.name}-replica", {**self.env, "SLUICE_PORT": str(free_port())}
        )
        self.replicas.append(replica)
        return replica, url

    def add_worker(self, clock_offset: str | None = None, **env: str) -> Proc:
        name = f"{self.api.name}-w{len(self.workers)}"
        worker = sluice("worker", name, {**self.env, **env}, clock_offset)
        self.workers.append(worker)
        return worker

    def status(self) -> str:
        """What `sluice status` prints for this stack's Redis."""
        done = subprocess.run(
            [sys.executable, "-m", "sluice", "status"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout

    def wait_ready(self, workers: int, timeout: float = 60) -> None:
        def ready() -> bool:
            for proc in (self.api, *self.workers):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                health = httpx.get(f"{self.base_url}/ready", timeout=1).json()
            except (httpx.HTTPError, ValueError):
                return False
            return int(health.get("workers", 0)) >= workers

        wait_until(ready, timeout, f"{self.api.name} with {workers} workers")

    def stop(self) -> None:
        procs = (*self.workers, self.api, *self.replicas)
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()


def start_stack(
    name: str,
    redis_url: str,
    workers: int,
    *,
    api_clock: str | None = None,
    worker_clock: str | None = None,
    **settings: str,
) -> Stack:
    """An API and `workers` workers; `*_clock`: faketime offsets for their wall clocks."""
    port = free_port()
    env = sluice_env(redis_url, port, **settings)
    stack = Stack(redis_url, sluice("api", name, env, api_clock), [], port, env)
    try:
        for _ in range(workers):
            stack.add_worker(worker_clock)
        stack.wait_ready(workers, timeout=120)
    except BaseException:
        stack.stop()  # a stack that never came up leaves no process behind
        raise
    return stack


SENTINEL_MASTER = "mymaster"


@dataclass(frozen=True)
class Secured:
    """How a `SentinelCluster` is locked: its data nodes speak TLS only (certificates from
    tests/tls.py) and want `password`; its Sentinels want `sentinel_password`."""

    certificates: Certificates
    password: str
    sentinel_password: str


class SentinelServer(Proc):
    """`redis-server --sentinel` (Debian's redis-server package has it built in) on a free
    port, monitoring `master_port` under `SENTINEL_MASTER` with a quorum of 2."""

    def __init__(
        self, master_port: int, directory: Path, *, down_after_ms: int, secured: Secured | None
    ) -> None:
        self.port = free_port()
        self.password = secured.sentinel_password if secured else None
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {directory}",
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {down_after_ms}",
            # A Sentinel that voted in a failover waits twice this before it leads one.
            f"sentinel failover-timeout {SENTINEL_MASTER} 3000",
        ]
        if secured:
            certs = secured.certificates
            lines += [
                f"requirepass {secured.sentinel_password}",
                f"sentinel sentinel-pass {secured.sentinel_password}",
                f"sentinel auth-pass {SENTINEL_MASTER} {secured.password}",
                # Sentinels reach the data nodes, and each other, over TLS (on a port of their
                # own, which they announce); clients ask them on the plain one.
                f"tls-port {free_port()}",
                "tls-replication yes",
                "tls-auth-clients no",
                f"tls-cert-file {certs.server_cert}",
                f"tls-key-file {certs.server_key}",
                f"tls-ca-cert-file {certs.ca}",
            ]
        config = directory / f"sentinel-{self.port}.conf"  # Sentinel rewrites its own file
        config.write_text("\n".join([*lines, ""]))
        super().__init__(
            f"sentinel-{self.port}", [require("redis-server"), str(config), "--sentinel"]
        )

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=2, decode_responses=True
        )

    def master_port(self) -> int | None:
        """Where this Sentinel says the master is; None while it cannot say."""
        try:
            with self.client() as client:
                address = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None


class SentinelCluster:
    """A master, a replica of it and three Sentinels watching them: real processes, the test's
    own. `down_after_ms`: how long a master may be silent before the Sentinels fail it over."""

    def __init__(
        self, directory: Path, *, down_after_ms: int = 1000, secured: Secured | None = None
    ) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.secured = secured
        self.nodes: dict[int, Proc] = {}
        self.sentinels: list[SentinelServer] = []
        self.first_master = 0

    def start(self) -> SentinelCluster:
        master = self._node()
        self.first_master = master
        self._node("--replicaof", "127.0.0.1", str(master))
        self.wait_replicated(master)
        self.sentinels = [
            SentinelServer(
                master, self.directory, down_after_ms=self.down_after_ms, secured=self.secured
            ).start()
            for _ in range(3)
        ]
        wait_until(self._sentinels_see_everyone, 30, "the Sentinels to see each other")
        return self

    def _node(self, *options: str, port: int | None = None) -> int:
        port = port or free_port()
        args = [
            *(require("redis-server"), "--bind", "127.0.0.1", "--port", str(port)),
            *("--databases", str(DATABASES), *NO_PERSISTENCE, "--enable-debug-command", "local"),
            # A replica writes what its master sends it to disk: not into the repository.
            *("--dir", str(self.directory), "--dbfilename", f"dump-{port}.rdb"),
        ]
        if secured := self.secured:
            certs = secured.certificates
            args += [
                *("--port", "0", "--tls-port", str(port), "--tls-replication", "yes"),
                *("--tls-cert-file", str(certs.server_cert), "--tls-key-file"),
                *(str(certs.server_key), "--tls-ca-cert-file", str(certs.ca)),
                *("--tls-auth-clients", "no"),
                *("--requirepass", secured.password, "--masterauth", secured.password),
            ]
        self.nodes[port] = Proc(f"redis-{port}", [*args, *options]).start()
        wait_until(lambda: self.role(port) is not None, 10, f"redis-server on {port}")
        return port

    @property
    def addresses(self) -> str:
        """`SLUICE_REDIS_SENTINELS`."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def url(self, db: int = 0) -> str:
        """`SLUICE_REDIS_URL`: the data nodes' password, TLS and database. Its host and port
        are the first master's, so code that ignores the Sentinels works until a failover."""
        if not (secured := self.secured):
            return f"redis://127.0.0.1:{self.first_master}/{db}"
        return (
            f"rediss://:{secured.password}@127.0.0.1:{self.first_master}/{db}"
            f"?ssl_ca_certs={secured.certificates.ca}&ssl_check_hostname=true"
        )

    def env(self) -> dict[str, str]:
        """The settings that point sluice at the Sentinels (with `url`)."""
        env = {"redis_sentinels": self.addresses, "redis_sentinel_master": SENTINEL_MASTER}
        if self.secured:
            env["redis_sentinel_password"] = self.secured.sentinel_password
        return env

    def client(self, port: int, db: int = 0) -> redis.Redis:
        if not (secured := self.secured):
            return redis.Redis(port=port, db=db, socket_timeout=2)
        return redis.Redis(
            port=port,
            db=db,
            socket_timeout=2,
            password=secured.password,
            ssl=True,
            ssl_ca_certs=str(secured.certificates.ca),
        )

    def master_port(self) -> int:
        ports = {s.master_port() for s in self.sentinels if s.alive()}
        if len(ports) != 1 or None in ports:
            raise RuntimeError(f"the Sentinels disagree on the master: {ports}")
        [port] = ports
        assert port is not None
        return port

    def role(self, port: int) -> str | None:
        try:
            with self.client(port) as client:
                return str(client.role()[0].decode())
        except (redis.RedisError, OSError):
            return None

    def wait_for_new_master(self, old: int, timeout: float = 30) -> int:
        """Once every Sentinel names a master other than `old`, and that node says it is one."""

        def moved() -> bool:
            ports = {s.master_port() for s in self.sentinels}
            return len(ports) == 1 and old not in ports and None not in ports

        wait_until(moved, timeout, f"the Sentinels to fail over from {old}")
        port = self.master_port()
        wait_until(lambda: self.role(port) == "master", timeout, f"{port} to be master")
        return port

    def wait_replicated(self, master_port: int, timeout: float = 30) -> None:
        """Until every other node running is a replica of `master_port` with its link up and
        its offset level with the master's."""

        def level() -> bool:
            try:
                with self.client(master_port) as master:
                    offset = master.info("replication")["master_repl_offset"]
                for port, node in self.nodes.items():
                    if port == master_port or not node.alive():
                        continue
                    with self.client(port) as replica:
                        info = replica.info("replication")
                    if info.get("master_port") != master_port:
                        return False
                    if info.get("master_link_status") != "up":
                        return False
                    if info.get("slave_repl_offset", -1) < offset:
                        return False
            except (redis.RedisError, OSError):
                return False
            return True

        wait_until(level, timeout, f"the replicas of {master_port} to catch up")

    def restart(self, port: int, *options: str) -> None:
        """The node on `port` again (it was killed): empty, as a node without persistence
        comes back, with redis-server's `options`."""
        self.nodes.pop(port).stop()
        (self.directory / f"dump-{port}.rdb").unlink(missing_ok=True)  # what it last synced
        self._node(*options, port=port)

    def _sentinels_see_everyone(self) -> bool:
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    master = client.sentinel_master(SENTINEL_MASTER)
            except redis.RedisError:
                return False
            if master["num-slaves"] < 1 or master["num-other-sentinels"] < 2:
                return False
        return True

    def stop(self) -> None:
        for proc in (*self.sentinels, *self.nodes.values()):
            proc.stop()
