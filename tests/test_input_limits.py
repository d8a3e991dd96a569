"""Input limits (issue 13): a body over `SLUICE_MAX_BODY_BYTES` is refused before it is held in
memory, and requests over the caps on messages, content parts and stop strings get a 400
naming the parameter."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import httpx
import psutil
import pytest

from shared.schema import MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOPS
from shared.settings import Settings
from tests.procs import Stack
from tests.test_validation import assert_openai_error

MiB = 1 << 20
LIMIT = Settings(backend="synthetic").max_body_bytes  # what the test stacks run with
REFUSED = 200 * MiB
USER = [{"role": "user", "content": "hi"}]


class PeakRSS:
    """The resident memory of a process before, and at most, while the block runs."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self.before = self.peak = self._rss()

    def _rss(self) -> int:
        rss: int = self._process.memory_info().rss
        return rss

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.before


def pieces(total: int, size: int = MiB) -> Iterator[bytes]:
    """`total` bytes in pieces of `size`, made once: the client holds one piece, not the body."""
    piece = b"x" * size
    for start in range(0, total, size):
        yield piece[: min(size, total - start)]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_200_mib_body_gets_413_and_the_api_does_not_hold_it(
    synthetic: Stack, declared: bool
) -> None:
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(REFUSED)  # else httpx sends it chunked
    started = time.monotonic()
    with PeakRSS(synthetic.api.pid) as rss:
        response = httpx.post(
            f"{synthetic.base_url}/v1/chat/completions",
            content=pieces(REFUSED),
            headers=headers,
            timeout=120,
        )
    print(
        f"\n{'declared' if declared else 'chunked'}: API RSS {rss.before / MiB:.1f} MiB before, "
        f"{rss.peak / MiB:.1f} MiB at most: +{rss.growth / MiB:.1f} MiB refusing "
        f"{REFUSED // MiB} MiB in {time.monotonic() - started:.1f} s"
    )

    assert_openai_error(response, 413, None)
    assert response.json()["error"]["code"] == "request_too_large"
    assert str(LIMIT) in response.json()["error"]["message"]
    assert rss.growth < 20 * MiB


def body_of(size: int) -> bytes:
    """A valid request of exactly `size` bytes (an unknown field pads it)."""
    body = json.dumps({"messages": USER, "max_tokens": 1, "padding": ""}).encode()
    return body[:-2] + b"x" * (size - len(body)) + body[-2:]


async def in_pieces(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("size", "status"), [(LIMIT, 200), (LIMIT + 1, 413)])
async def test_body_up_to_the_limit_is_read_and_one_byte_more_is_refused(
    client: httpx.AsyncClient, declared: bool, size: int, status: int
) -> None:
    body = body_of(size)
    assert len(body) == size
    content: bytes | AsyncIterator[bytes] = body if declared else in_pieces(body)

    response = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )

    assert response.status_code == status, response.text
    assert ("content-length" in response.request.headers) is declared


def parts(count: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "a"}] * count}]


TOO_LONG_STOP = "x" * (MAX_STOP_CHARS + 1)
OVER_CAPS: list[tuple[str, str, dict[str, Any], str, int]] = [
    ("messages", "/v1/chat/completions", {"messages": USER * (MAX_MESSAGES + 1)}, "messages",
     MAX_MESSAGES),
    ("content parts", "/v1/chat/completions", {"messages": parts(MAX_CONTENT_PARTS + 1)},
     "messages[0].content", MAX_CONTENT_PARTS),
    ("stop strings", "/v1/chat/completions", {"messages": USER, "stop": ["a"] * (MAX_STOPS + 1)},
     "stop", MAX_STOPS),
    ("stop string length", "/v1/chat/completions", {"messages": USER, "stop": TOO_LONG_STOP},
     "stop", MAX_STOP_CHARS),
    ("stop string length in a list", "/v1/chat/completions",
     {"messages": USER, "stop": ["end", TOO_LONG_STOP]}, "stop[1]", MAX_STOP_CHARS),
    ("completions: stop strings", "/v1/completions",
     {"prompt": "hi", "stop": ["a"] * (MAX_STOPS + 1)}, "stop", MAX_STOPS),
    ("completions: stop string length", "/v1/completions",
     {"prompt": "hi", "stop": [TOO_LONG_STOP]}, "stop[0]", MAX_STOP_CHARS),
    ("seed format: stop strings", "/v1/chat/completions",
     {"prompt": "hi", "stream": True, "stop": ["a"] * (MAX_STOPS + 1)}, "stop", MAX_STOPS),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param", "cap"), [pytest.param(*c[1:], id=c[0]) for c in OVER_CAPS]
)
async def test_request_over_a_cap_gets_400_naming_the_parameter_and_the_cap(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str, cap: int
) -> None:
    response = await client.post(path, json=body)

    assert_openai_error(response, 400, param)
    assert str(cap) in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": USER * MAX_MESSAGES},
        {"messages": parts(MAX_CONTENT_PARTS)},
        {"messages": USER, "stop": ["x" * MAX_STOP_CHARS] * MAX_STOPS},
    ],
    ids=["messages", "content parts", "stop strings"],
)
async def test_request_at_the_caps_is_served(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post("/v1/chat/completions", json=body | {"max_tokens": 1})

    assert response.status_code == 200, response.text
