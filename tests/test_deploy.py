"""compose.yaml and the Dockerfile, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return dict(compose["services"])


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def test_compose_runs_redis_api_and_worker(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "api", "worker"}


def test_api_publishes_8080(services: dict[str, Any]) -> None:
    assert "8080:8080" in services["api"]["ports"]


def test_worker_can_be_scaled(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    assert all("healthcheck" in s for s in services.values())


@pytest.mark.parametrize("name", ["api", "worker"])
def test_app_services_wait_for_a_healthy_redis_and_point_at_it(
    services: dict[str, Any], name: str
) -> None:
    service = services[name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["environment"]["SLUICE_REDIS_URL"].startswith("redis://redis:6379")
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert service["command"][0] == "sluice"


def test_every_sluice_variable_in_compose_is_a_setting(services: dict[str, Any]) -> None:
    names = {
        n for s in services.values() for n in s.get("environment", {}) if n.startswith("SLUICE_")
    }
    assert names
    assert {n.removeprefix("SLUICE_").lower() for n in names} <= set(Settings.model_fields)


def test_dockerfile_builds_llama_portably_and_runs_sluice_unprivileged(dockerfile: str) -> None:
    assert "deploy/llama-wheel.sh" in dockerfile
    assert "-DGGML_NATIVE=OFF" in (ROOT / "deploy" / "llama-wheel.sh").read_text()
    assert re.search(r"^EXPOSE 8080$", dockerfile, re.M)
    assert re.search(r"^USER (?!root)\S+$", dockerfile, re.M)
    assert re.search(r'^CMD \["sluice"', dockerfile, re.M)
