"""tests/prereqs.py: a missing program fails the tests that need it, and in CI so does a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prereqs import INSTALL, VENV_BIN, require

pytest_plugins = ["pytester"]


def test_a_missing_program_fails_the_test_naming_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there

    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as stopped:
        require("faketime")

    assert stopped.type is pytest.fail.Exception  # a failure, never a skip
    assert str(stopped.value) == (
        "faketime is not installed: apt-get install faketime (README, Set up)"
    )


@pytest.mark.parametrize("command", sorted(INSTALL.keys() - {"libfaketime"}))
def test_every_program_the_tests_need_is_here(command: str) -> None:
    """This machine has them all (.ci/run installs them), so no test of theirs fails for it."""
    assert require(command)


def test_kubectl_comes_with_the_dev_extras(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    assert Path(require("kubectl")).parent == VENV_BIN


@pytest.mark.parametrize(("ci", "exit_code"), [("true", 1), ("", 0)], ids=["ci", "local"])
def test_in_ci_a_skipped_test_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, exit_code: int
) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(
        "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('no tool')\n\n"
        "def test_plain():\n    pass\n"
    )

    result = pytester.runpytest("-p", "tests.prereqs", "-p", "no:asyncio")

    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == exit_code
