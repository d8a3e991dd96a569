"""compose.yaml and the Dockerfile, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).parents[1]
APP_SERVICES = ["api", "worker"]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return dict(compose["services"])


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def instructions(dockerfile: str, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, in order."""
    return re.findall(rf"^{keyword}\s+(.+?)\s*$", dockerfile, re.M | re.I)


def test_compose_runs_redis_api_and_worker(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "api", "worker"}


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
def test_app_service_points_at_the_redis_service(services: dict[str, Any], name: str) -> None:
    assert services[name]["environment"]["SLUICE_REDIS_URL"].startswith("redis://redis:6379/")


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


def test_dockerfile_starts_sluice(dockerfile: str) -> None:
    starts = instructions(dockerfile, "ENTRYPOINT") or instructions(dockerfile, "CMD")
    assert starts
    assert re.match(r'\[?\s*"?sluice\b', starts[-1])
