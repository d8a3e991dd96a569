"""One error envelope, one mapper: every failure a client sees is OpenAI-shaped."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from api.metrics import REJECTED
from shared.errors import (
    GenerationFailed,
    InvalidRequest,
    RedisUnavailable,
    SluiceError,
    UnknownRoute,
)

log = logging.getLogger("sluice.api")
REJECTIONS = {401, 413, 429, 503}
"""Statuses that refuse a request before it is queued, counted by `sluice_rejected_total`."""


def to_sluice_error(exc: Exception) -> SluiceError:
    """The single mapping from whatever was raised to what the client is told."""
    match exc:
        case SluiceError():
            return exc
        case RedisError() | OSError():
            # The detail names Redis's host and port: it is for the log, not for clients.
            log.warning("Redis is unavailable: %s", exc)
            return RedisUnavailable("Redis is unavailable")
        case RequestValidationError():
            return InvalidRequest(str(exc.errors()[0].get("msg", "invalid request")))
        case HTTPException(status_code=404):
            return UnknownRoute("no such route")
        case HTTPException(status_code=405):
            return InvalidRequest("method not allowed")
        case _:
            log.error("unhandled error", exc_info=exc)
            return GenerationFailed("internal server error")


def _utf8(text: str) -> str:
    """`text`, with any lone surrogate (it has no UTF-8 encoding) written as Python escapes it."""
    return text.encode("utf-8", "backslashreplace").decode()


def error_response(exc: Exception) -> JSONResponse:
    error = to_sluice_error(exc)
    status = error.status if not isinstance(exc, HTTPException) else exc.status_code
    headers = error.headers()
    if status in REJECTIONS:
        REJECTED.labels(error.code or str(status)).inc()
    # A message may quote the request; an error must not fail while it is being encoded.
    body = {k: _utf8(v) if isinstance(v, str) else v for k, v in error.body().items()}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (
        SluiceError,
        RedisError,
        OSError,
        RequestValidationError,
        HTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, _handle)
