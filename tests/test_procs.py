"""tests/procs.py itself: what tests read of a process's log is that process's output alone."""

from __future__ import annotations

import sys
import uuid

from tests.procs import LOGS, Proc


def printed(name: str, text: str) -> Proc:
    proc = Proc(name, [sys.executable, "-c", f"print({text!r})"]).start()
    assert proc.popen is not None
    assert proc.popen.wait(30) == 0
    return proc


def test_a_process_log_holds_its_own_output_only() -> None:
    name = f"log-{uuid.uuid4().hex[:8]}"
    LOGS.mkdir(exist_ok=True)
    (LOGS / f"{name}.log").write_text("a line from an earlier run\n")

    first = printed(name, "first")
    second = printed(name, "second")  # a process of the same name: a stack's replica, say

    assert first.log_text() == "first\n"
    assert second.log_text() == "second\n"
    assert first.log_path != second.log_path
    for proc in (first, second):
        assert proc.log_path is not None
        proc.log_path.unlink()
