"""Errors as types. Each knows its HTTP status and its OpenAI error envelope."""

from __future__ import annotations

from typing import ClassVar

# Not typing's: before Python 3.12 pydantic cannot describe that one (shared.schema.ErrorResponse).
from typing_extensions import TypedDict


class ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class SluiceError(Exception):
    status: int = 500
    """A class's own, but an error relayed from elsewhere (`RemoteError`) carries its origin's."""
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> ErrorBody:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def headers(self) -> dict[str, str]:
        """Response headers that come with this error."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r})"


class InvalidRequest(SluiceError):
    status = 400
    type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ModelNotFound(SluiceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class UnknownRoute(SluiceError):
    status = 404
    type = "invalid_request_error"


class StreamNotFound(SluiceError):
    status = 404
    type = "invalid_request_error"
    code = "stream_not_found"


class StreamTruncated(SluiceError):
    """Entries a reader asked for are gone from the stream (trimmed or deleted by hand: sluice
    caps a stream above what it can hold, `entry_cap`): said, never skipped silently."""

    status = 410
    type = "invalid_request_error"
    code = "stream_truncated"


class StreamFinished(SluiceError):
    status = 409
    type = "invalid_request_error"
    code = "stream_finished"


class QueueFull(SluiceError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class RateLimited(QueueFull):
    """An API key at one of its limits: requests or tokens per minute, or open streams."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int, limit_headers: dict[str, str]) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        return super().headers() | self.limit_headers


class InvalidApiKey(SluiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ServiceUnavailable(SluiceError):
    status = 503
    code = "service_unavailable"


class RedisUnavailable(ServiceUnavailable):
    code = "redis_unavailable"

    RETRY_AFTER_S: ClassVar[int] = 1
    """A request refused while Redis is away (a restart, a failover's election) may come back
    soon: a failover takes seconds."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.RETRY_AFTER_S)}


class RedisFailover(ServiceUnavailable):
    """Redis failed over (Sentinel) while a stream was open, and the stream cannot be shown to
    go on exactly where its reader is: entries it was sent are not on the new master (they had
    not reached a replica), or Redis did not come back within `SLUICE_REDIS_FAILOVER_S`. Never
    a silent gap: a resume after it continues exactly, or ends so again."""

    code = "redis_failover"


class StreamReaderFailed(ServiceUnavailable):
    """The API process's shared stream reader failed; resume the stream (it is restarting)."""

    code = "stream_reader_failed"


class NoWorkers(ServiceUnavailable):
    """No live worker serves the model: none is up, or (after a Redis failover) none has beaten
    on the new master yet."""

    code = "no_workers"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class GenerationFailed(SluiceError):
    code = "generation_failed"


class WorkerLost(SluiceError):
    code = "worker_lost"


class Cancelled(SluiceError):
    """Generation was stopped: by a cancel request, or because no client was reading."""

    type = "cancelled"
    code = "cancelled"


class ClientDisconnected(SluiceError):
    """The client hung up before its (non-streaming) response was ready; nobody reads this."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class UpstreamUnavailable(ServiceUnavailable):
    """The `openai` backend's engine did not answer, or answered 5xx or 429, until the job's time
    to wait was up; or, refused at once with `Retry-After`, every live worker of the model
    reports its engine down."""

    code = "upstream_unavailable"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class UpstreamTimeout(SluiceError):
    """The `openai` backend's engine said nothing for `SLUICE_UPSTREAM_TIMEOUT_S`: before its first
    byte, or between two chunks of its answer."""

    status = 504
    code = "upstream_timeout"


class UpstreamError(GenerationFailed):
    """The `openai` backend's engine failed after it had started answering (its stream was cut)."""

    code = "upstream_error"


class UpstreamRejected(SluiceError):
    """The `openai` backend's engine refused the request (a 4xx): its status and its own error."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        super().__init__(body["message"], param=body["param"])
        self.status = status
        self._body = body

    def body(self) -> ErrorBody:
        return self._body


class RemoteError(SluiceError):
    """An error that crossed the stream from a worker: carries the worker's envelope as is."""

    def __init__(self, body: ErrorBody, status: int | None = None) -> None:
        super().__init__(body["message"], param=body["param"])
        self._body = body
        if status is not None:
            self.status = status

    def body(self) -> ErrorBody:
        return self._body
