"""The official `openai` npm package, run by Node.js against sluice, works unchanged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.prereqs import npm_packages
from tests.procs import Stack

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node_client() -> Path:
    npm_packages(JS, "openai")
    return JS / "openai_client.mjs"


@pytest.fixture
def seen(node_client: Path, synthetic: Stack) -> dict[str, Any]:
    done = subprocess.run(
        ["node", str(node_client)],
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "SLUICE_BASE_URL": f"{synthetic.base_url}/v1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_node_sdk_lists_models_streams_and_collects(seen: dict[str, Any]) -> None:
    assert seen["models"] == ["synthetic"]
    assert seen["streamed"]["text"].startswith("You asked: hello from node")
    assert seen["streamed"]["finish"] == "stop"
    assert seen["usage"]["completion_tokens"] > 0
    assert seen["collected"] == "You asked: hello from"


def test_node_sdk_raises_its_own_not_found_error(seen: dict[str, Any]) -> None:
    assert seen["error"] == {"name": "NotFoundError", "status": 404, "code": "model_not_found"}
