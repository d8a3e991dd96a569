"""Logging for both processes: plain lines, or one JSON object per line (`SLUICE_LOG_FORMAT=json`).

Every line logged while a request is handled carries its stream id, and the name of its API
key when authentication is on (never the key): `bind` sets them for the current task, and
tasks it starts inherit them.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Literal

LogFormat = Literal["text", "json"]

stream_id_var: ContextVar[str | None] = ContextVar("stream_id", default=None)
key_name_var: ContextVar[str | None] = ContextVar("key_name", default=None)


def bind(stream_id: str, key_name: str | None = None) -> None:
    """What this task's log lines are about, from here on."""
    stream_id_var.set(stream_id)
    if key_name is not None:
        key_name_var.set(key_name)


class JsonFormatter(logging.Formatter):
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


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        stream_id = stream_id_var.get()
        return line if stream_id is None else f"{line} [stream {stream_id}]"


def configure(log_format: LogFormat) -> None:
    """The root logger's one handler; uvicorn's and arq's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
