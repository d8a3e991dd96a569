"""Logging for both processes: plain lines, or one JSON object per line (`SLUICE_LOG_FORMAT=json`).

Every line logged while a request is handled carries its stream id, and the name of its API
key when authentication is on (never the key): `bind` sets them for the current task, and
tasks it starts inherit them.

A line costs little: lines are written in batches (`BatchingHandler`), the time stamp is
formatted once a second, and `logging` is told not to look up what no line shows (the caller's
frame, thread and process: the logging HOWTO's "Optimization"). In bursts of short requests
(bench/overhead.py), logging at INFO the old way (a line per request in the API, two per job in
the worker, each written and stamped on its own) was about a tenth of sluice's CPU per request;
this way, with one line a job, about half that.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

stream_id_var: ContextVar[str | None] = ContextVar("stream_id", default=None)
key_name_var: ContextVar[str | None] = ContextVar("key_name", default=None)


def bind(stream_id: str, key_name: str | None = None) -> None:
    """What this task's log lines are about, from here on."""
    stream_id_var.set(stream_id)
    if key_name is not None:
        key_name_var.set(key_name)


FLUSH_S = 0.1
"""How often lines are written while they come."""
QUIET_FLUSHES = 10
"""When none come, flushes space out to this many times `FLUSH_S`."""


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches, as nginx's `access_log … buffer= flush=` does: INFO lines wait
    for the next flush, every `flush_s` while lines come and up to ten times that apart when
    none do; a WARNING or worse goes out at once, with the lines before it, and everything left
    goes out at exit (`logging.shutdown` flushes every handler). A process killed outright
    (SIGKILL) loses the INFO lines of its last flush interval.

    The flushes come from a thread of their own that wakes on its own clock: waking it for each
    batch instead (a condition's notify) cost the logging thread more than the writes it saved,
    and waking it every `flush_s` when nothing comes cost an idle process 0.6 ms a second."""

    def __init__(self, stream: TextIO | None = None, flush_s: float = FLUSH_S) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._lines: list[str] = []
        self._flush_s = flush_s
        threading.Thread(target=self._flush_forever, name="log-flusher", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        """Called with the handler's lock held (`Handler.handle`)."""
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if not self._lines:
            return
        text, self._lines = "".join(self._lines), []
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: these lines are lost
            pass

    def _flush_forever(self) -> None:
        pause = self._flush_s
        while True:
            time.sleep(pause)
            if self._lines:  # read without the lock: a line it misses goes at the next flush
                self.flush()
                pause = self._flush_s
            else:
                pause = min(pause * 2, QUIET_FLUSHES * self._flush_s)


class SecondStamps(logging.Formatter):
    """`logging.Formatter`'s time stamp (`2026-12-05 10:43:38,123`), its date and time formatted
    once a second rather than for every line. Formatters run under their handler's lock."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
        return f"{self._stamp},{int(record.msecs):03d}"


class JsonFormatter(SecondStamps):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (stream_id := stream_id_var.get()) is not None:
            line["stream_id"] = stream_id
        if (key_name := key_name_var.get()) is not None:
            line["key"] = key_name
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(SecondStamps):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        stream_id = stream_id_var.get()
        return line if stream_id is None else f"{line} [stream {stream_id}]"


def configure(log_format: LogFormat) -> None:
    """The root logger's one handler; uvicorn's and arq's loggers propagate to it."""
    # What no line of ours shows, which `logging` would look up for every record otherwise.
    logging._srcfile = None  # the caller's frame (a stack walk)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
