"""The `sluice` command: `sluice api`, `sluice worker`, `sluice dev` (both, for a laptop), and
`sluice keys` (API keys kept in Redis)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import redis

from shared import heap, tracing
from shared.logs import configure as configure_logging
from shared.redis_url import sync_client
from shared.settings import Settings

log = logging.getLogger("sluice")


def serve_api(settings: Settings) -> None:
    import uvicorn

    from api.main import create_app

    tracing.setup("sluice-api")

    # After its graceful shutdown uvicorn re-raises the signal that stopped it. Raised into this
    # handler, it becomes a clean exit (0), and `sluice dev` still stops its children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app(settings)
    heap.settle(settings.gc_threshold)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
        log_config=None,  # uvicorn's lines go through ours (shared/logs.py), JSON if asked
        # Longer than the streams' own grace, which ends each with an event saying why.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


def serve_worker(settings: Settings) -> None:
    from worker.main import run

    tracing.setup("sluice-worker")
    run(settings)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway `redis-server` on a free port, stopped on exit."""
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("no Redis answers at SLUICE_REDIS_URL and redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("the private redis-server did not start")
            time.sleep(0.05)
        log.info("no Redis answered at SLUICE_REDIS_URL; started a private one at %s", url)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def dev(settings: Settings, workers: int) -> None:
    """API in this process, `workers` worker processes beside it, Redis if none answers."""
    # With Sentinels the deployment's Redis is theirs: never a private one.
    existing = bool(settings.redis_sentinels) or redis_answers(settings.redis_url)
    with nullcontext(settings.redis_url) if existing else private_redis() as url:
        env = {**os.environ, "SLUICE_REDIS_URL": url}
        children = [
            subprocess.Popen([sys.executable, "-m", "sluice", "worker"], env=env)
            for _ in range(workers)
        ]
        try:
            serve_api(settings.model_copy(update={"redis_url": url}))
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                child.wait()


def keys_command(settings: Settings, args: argparse.Namespace) -> None:
    """`sluice keys create|list|revoke`: a new key is the only line on stdout; errors exit 1."""
    from shared.keys import KeyExists, Limits, UnknownKey, create_key, list_keys, revoke_key

    with sync_client(settings, socket_connect_timeout=5) as client:
        try:
            if args.action == "create":
                limits = Limits(args.rpm, args.tpm, args.max_streams)
                print(create_key(client, args.name, limits))
            elif args.action == "revoke":
                revoke_key(client, args.name)
                print(f"revoked {args.name}", file=sys.stderr)
            else:
                print("name\trpm\ttpm\tmax_streams\tcreated\tlast_used")
                for record, used in list_keys(client):
                    limits = record.limits
                    cells = [record.name, limits.rpm, limits.tpm, limits.max_streams]
                    cells += [_when(record.created), _when(used)]
                    print("\t".join("default" if c is None else str(c) for c in cells))
        except (KeyExists, UnknownKey) as exc:
            sys.exit(f"sluice keys: {exc}")
        except (redis.RedisError, OSError) as exc:
            sys.exit(f"sluice keys: Redis is unavailable: {exc}")


def status_command(settings: Settings) -> None:
    """`sluice status`: open streams, throughput, and each model's queue and workers, as Redis
    has them."""
    from shared.protocol import worker_ttl_ms
    from shared.status import STATUS_KEYS, STATUS_SCRIPT, Status, status_args

    args = status_args(worker_ttl_ms(settings.heartbeat_s))
    try:
        with sync_client(settings, socket_connect_timeout=5) as client:
            reply = client.eval(STATUS_SCRIPT, len(STATUS_KEYS), *STATUS_KEYS, *args)
    except (redis.RedisError, OSError) as exc:
        sys.exit(f"sluice status: Redis is unavailable: {exc}")
    print(Status.from_reply(reply).render())


def _when(unix_s: int | None) -> str:
    if unix_s is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("api", help="serve the HTTP API")
    commands.add_parser("worker", help="run a generation worker")
    dev_parser = commands.add_parser("dev", help="api + workers (+ Redis if none answers)")
    dev_parser.add_argument("--workers", type=int, default=1)
    keys_parser = commands.add_parser("keys", help="manage API keys (stored hashed in Redis)")
    keys_actions = keys_parser.add_subparsers(dest="action", required=True)
    create = keys_actions.add_parser("create", help="make a key; prints it, the only time")
    create.add_argument("name")
    for option, what in (("--rpm", "requests"), ("--tpm", "generated tokens")):
        create.add_argument(option, type=int, help=f"{what} per minute (default: the server's)")
    create.add_argument("--max-streams", type=int, help="streams open at once")
    keys_actions.add_parser("list", help="names, limits, created and last used (never a key)")
    keys_actions.add_parser("revoke", help="revoke a key everywhere").add_argument("name")
    commands.add_parser("status", help="queue, workers, open streams, tokens/s (one screen)")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_format)
    # arq logs two lines per job, each quoting the job's arguments, the prompt included: at
    # thousands of streams that is real CPU, and prompts do not belong in logs.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    if args.command == "keys":
        keys_command(settings, args)
    elif args.command == "status":
        status_command(settings)
    elif args.command == "api":
        serve_api(settings)
    elif args.command == "worker":
        serve_worker(settings)
    else:
        dev(settings, args.workers)


if __name__ == "__main__":
    main()
