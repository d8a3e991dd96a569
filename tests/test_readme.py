"""Every README code block that talks to a server runs against a live one: docs cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.prereqs import require
from tests.procs import Stack
from tests.sse import SSEResult, parse_sse

README = Path(__file__).parents[1] / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
RUNNERS = {"bash": ["bash", "-c"], "python": [sys.executable, "-c"], "javascript": ["node", "-e"]}
NEEDS = {"bash": "curl", "javascript": "node"}
"""The program each language's examples need besides their runner's own (README's use curl)."""


def runnable_blocks(*, tools: bool = False) -> list[tuple[str, str]]:
    """The blocks that talk to a server: those with tools (run by tests/test_tools.py on the
    real model: the synthetic backend calls no tools), or the others."""
    blocks = [(lang, code) for lang, code in FENCE.findall(README.read_text())]
    return [
        (lang, code)
        for lang, code in blocks
        if lang in RUNNERS and "localhost:8080" in code and ("tool_choice" in code) == tools
    ]


BLOCKS = runnable_blocks()


def test_readme_has_curl_python_and_javascript_examples() -> None:
    assert sorted({lang for lang, _ in BLOCKS}) == ["bash", "javascript", "python"]


@pytest.mark.parametrize(
    ("lang", "code"), BLOCKS, ids=[f"{n}-{b[0]}" for n, b in enumerate(BLOCKS)]
)
def test_readme_example_runs_against_a_live_server(
    synthetic: Stack, lang: str, code: str, tmp_path: Path
) -> None:
    if lang in NEEDS:
        require(NEEDS[lang])
    if lang == "javascript":
        code = f"(async () => {{\n{code}\n}})();"  # top-level await, without a module file
    code = code.replace("http://localhost:8080", synthetic.base_url)

    done = subprocess.run(
        [*RUNNERS[lang], code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    if lang == "bash":  # curl prints raw event streams
        events, _ = parse_sse(done.stdout.splitlines())
        assert [e.data for e in events].count("[DONE]") >= 1
        assert not SSEResult(200, httpx.Headers(), events).errors
    else:
        assert done.stdout.startswith("You asked: Explain streaming APIs")
