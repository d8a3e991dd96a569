"""Log lines go out in batches (shared/logs.py): an INFO line within `flush_s`, a WARNING at once
with the lines before it, every line at exit; stamps as `logging` writes them."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.logs import BatchingHandler, TextFormatter
from tests.procs import eventually


def python(script: str) -> subprocess.CompletedProcess[str]:
    """`script` run by a Python process of its own (logging's set-up is process-wide)."""
    command = [sys.executable, "-c", script]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own, writing through a new `BatchingHandler` (its first flush 0.5 s on)
    to a string."""
    stream = io.StringIO()
    handler = BatchingHandler(stream, flush_s=0.5)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.logs.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)
    handler.close()


async def test_info_lines_wait_to_share_a_write_then_go_out(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    for n in range(3):
        logger.info("line %d", n)
    assert stream.getvalue() == ""  # none written on its own
    await eventually(stream.getvalue, "the batch")
    assert stream.getvalue() == "INFO line 0\nINFO line 1\nINFO line 2\n"


def test_a_warning_goes_out_at_once_after_the_lines_before_it(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.info("before")
    logger.warning("now")
    assert stream.getvalue() == "INFO before\nWARNING now\n"


def test_a_process_that_exits_writes_every_line_in_order() -> None:
    script = (
        "import logging\n"
        "from shared.logs import configure\n"
        "configure('text')\n"
        "for n in range(500): logging.getLogger('sluice.test').info('line %d', n)\n"
    )
    lines = python(script).stderr.splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(n) for n in range(500)]


def test_configure_tells_logging_not_to_look_up_the_caller() -> None:
    """`logging._srcfile` (private, the logging HOWTO's "Optimization"): None, no stack walk per
    record. If a Python renamed it, setting it would silently do nothing; this would fail."""
    script = (
        "import logging\n"
        "assert logging._srcfile\n"
        "from shared.logs import configure\n"
        "configure('text')\n"
        "class Show(logging.Handler):\n"
        "    def emit(self, record): print(record.funcName, record.lineno, record.thread)\n"
        "logging.getLogger().addHandler(Show())\n"
        "logging.getLogger('sluice.test').info('hello')\n"
    )
    done = python(script)
    assert done.stdout.strip() == "(unknown function) 0 None", done.stderr


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_stamps_are_loggings_own(created: float) -> None:
    record = logging.makeLogRecord({"created": created, "msecs": (created % 1) * 1000})
    ours = TextFormatter()
    assert ours.formatTime(record) == logging.Formatter().formatTime(record)
    assert ours.formatTime(record) == logging.Formatter().formatTime(record)  # from its cache
