"""Fuzzing: schemathesis sends every route what its OpenAPI document allows, and what it does not.

Whatever it sends, the answer is never a 5xx: bad input is a 400 that names the parameter.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error

from api.main import create_app
from shared.settings import Settings
from tests.procs import RedisServer, Stack, start_stack

DB = 15  # flushed first: the fault tests' stacks take databases 6 and up, wrapping round


@pytest.fixture(scope="module")
def fuzzed(redis_server: RedisServer) -> Iterator[Stack]:
    """A stack whose generations end at once: no pacing, a small context, room in the queue."""
    with redis_server.client(DB) as redis:
        redis.flushdb()
    stack = start_stack(
        "fuzz",
        redis_server.url(DB),
        2,
        backend="synthetic",
        synthetic_tokens_per_s="0",
        n_ctx="512",
        max_queue="100000",
        access_log="false",
    )
    yield stack
    stack.stop()


# The document as the API serves it (test_openapi checks that it does), built in-process:
# schemathesis's loader from a fixture fails on pytest 9 (it sets `Function._nodeid`).
schema = schemathesis.openapi.from_dict(create_app(Settings(backend="synthetic")).openapi())


@schema.parametrize()
@settings(max_examples=50, deadline=None, database=None)
def test_no_request_gets_a_server_error(fuzzed: Stack, case: schemathesis.Case) -> None:
    case.call_and_validate(base_url=fuzzed.base_url, checks=[not_a_server_error], timeout=30)
