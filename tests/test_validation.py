"""Bad input gets a 400 in OpenAI's error shape, never a 500 or a traceback."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from api.errors import error_response
from shared.errors import ModelNotFound
from shared.settings import Settings

USER = [{"role": "user", "content": "hi"}]
N_CTX = Settings(backend="synthetic").n_ctx  # what the test stacks run with
SURROGATE = "\ud800"  # a lone surrogate, as the JSON escape "\ud800" decodes


def text_parts(*texts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}]


BAD_BODIES: list[tuple[str, Any, str | None]] = [
    ("empty prompt", {"prompt": "", "stream": True}, "prompt"),
    ("whitespace prompt", {"prompt": " \n\t ", "stream": True}, "prompt"),
    ("prompt over 5000 characters", {"prompt": "x" * 5001, "stream": True}, "prompt"),
    ("seed format with stream false", {"prompt": "hi", "stream": False}, "stream"),
    ("seed format without stream", {"prompt": "hi"}, "stream"),
    ("seed format with stream as string", {"prompt": "hi", "stream": "true"}, "stream"),
    ("prompt of the wrong type", {"prompt": 42, "stream": True}, "prompt"),
    ("both prompt and messages", {"prompt": "hi", "messages": USER, "stream": True}, "prompt"),
    ("neither prompt nor messages", {"stream": True}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    (
        "messages over 5000 characters",
        {"messages": [{"role": "user", "content": "x" * 3000}] * 2},
        "messages",
    ),
    (
        "messages with only whitespace",
        {"messages": [{"role": "user", "content": "  "}]},
        "messages",
    ),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("temperature out of range", {"messages": USER, "temperature": 3}, "temperature"),
    ("top_p out of range", {"messages": USER, "top_p": 0}, "top_p"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("max_tokens as string", {"messages": USER, "max_tokens": "10"}, "max_tokens"),
    ("too many stop strings", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stream not a boolean", {"messages": USER, "stream": "yes"}, "stream"),
    ("n above eight", {"messages": USER, "n": 9}, "n"),
    ("n zero", {"messages": USER, "n": 0}, "n"),
    ("tools", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ("logprobs as a number", {"messages": USER, "logprobs": 5}, "logprobs"),
    (
        "top_logprobs above 20",
        {"messages": USER, "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("top_logprobs without logprobs", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("logit_bias above 100", {"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias on a word", {"messages": USER, "logit_bias": {"yes": 5}}, "logit_bias"),
    ("logit_bias on a negative id", {"messages": USER, "logit_bias": {"-1": 5}}, "logit_bias"),
    (
        "a lone surrogate in a field sluice passes to engines",
        {"messages": USER, "top_k": SURROGATE},
        "top_k",
    ),
    (
        "json response format",
        {"messages": USER, "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "image content part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    ("lone surrogate in prompt", {"prompt": f"hi {SURROGATE}", "stream": True}, "prompt"),
    (
        "lone surrogate in message content",
        {"messages": [{"role": "user", "content": SURROGATE}]},
        "messages[0].content",
    ),
    (
        "lone surrogate in a text part",
        {"messages": text_parts("fine", SURROGATE)},
        "messages[0].content[1].text",
    ),
    (
        "lone surrogate in a message name",
        {"messages": [{"role": "user", "content": "hi", "name": SURROGATE}]},
        "messages[0].name",
    ),
    ("lone surrogate in stop", {"messages": USER, "stop": SURROGATE}, "stop"),
    ("lone surrogate in a stop list", {"messages": USER, "stop": ["end", SURROGATE]}, "stop[1]"),
    ("lone surrogate in model", {"messages": USER, "model": SURROGATE}, "model"),
    (
        "text part without text",
        {"messages": [*USER, {"role": "user", "content": [{"type": "text"}]}]},
        "messages[1].content[0].text",
    ),
    ("text part with null text", {"messages": text_parts(None)}, "messages[0].content[0].text"),
    ("text part with a number", {"messages": text_parts(5)}, "messages[0].content[0].text"),
    ("max_tokens the context cannot hold", {"messages": USER, "max_tokens": N_CTX}, "max_tokens"),
    (
        "max_completion_tokens the context cannot hold",
        {"messages": USER, "max_completion_tokens": 10**9},
        "max_completion_tokens",
    ),
    (
        "seed format with max_tokens the context cannot hold",
        {"prompt": "hi", "stream": True, "max_tokens": N_CTX},
        "max_tokens",
    ),
    (
        "min_tokens above max_tokens",
        {"messages": USER, "max_tokens": 5, "min_tokens": 6},
        "min_tokens",
    ),
    (
        "min_tokens above max_completion_tokens",
        {"messages": USER, "max_tokens": 50, "max_completion_tokens": 5, "min_tokens": 6},
        "min_tokens",
    ),
    ("seed above 2**64 - 1", {"messages": USER, "seed": 2**64}, "seed"),
    ("seed below -2**63", {"messages": USER, "seed": -(2**63) - 1}, "seed"),
]

BAD_COMPLETION_BODIES: list[tuple[str, Any, str | None]] = [
    ("logprobs above 20", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("logprobs as a boolean", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("top_logprobs, chat's form", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs"),
    ("lone surrogate in prompt", {"prompt": SURROGATE}, "prompt"),
    ("lone surrogate in a stop list", {"prompt": "hi", "stop": [SURROGATE]}, "stop[0]"),
    ("max_tokens the context cannot hold", {"prompt": "hi", "max_tokens": N_CTX}, "max_tokens"),
    (
        "min_tokens above max_tokens",
        {"prompt": "hi", "max_tokens": 1, "min_tokens": 2},
        "min_tokens",
    ),
    ("seed above 2**64 - 1", {"prompt": "hi", "seed": 2**64}, "seed"),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text


async def post(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    """POST `body` as JSON with `\\u` escapes: how a lone surrogate travels (it has no UTF-8)."""
    return await client.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [pytest.param("/v1/chat/completions", *case[1:], id=case[0]) for case in BAD_BODIES]
    + [
        pytest.param("/v1/completions", *case[1:], id=f"completions: {case[0]}")
        for case in BAD_COMPLETION_BODIES
    ],
)
async def test_bad_request_body_gets_400_with_openai_error(
    client: httpx.AsyncClient, path: str, body: Any, param: str | None
) -> None:
    response = await post(client, path, body)

    assert_openai_error(response, 400, param)
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_max_tokens_error_says_the_context_length(client: httpx.AsyncClient) -> None:
    response = await post(client, "/v1/chat/completions", {"messages": USER, "max_tokens": 10**6})

    assert f"maximum context length is {N_CTX} tokens" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": N_CTX - 1},
        {"max_tokens": 8, "min_tokens": 8},
        {"max_tokens": 8, "max_completion_tokens": 9, "min_tokens": 9},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"messages": text_parts("a", "b")},
        {"n": 8, "max_tokens": 2},
        {"logprobs": True, "top_logprobs": 20, "max_tokens": 2},
    ],
    ids=repr,
)
async def test_values_at_the_limits_are_accepted(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await post(client, "/v1/chat/completions", {"messages": USER} | body)

    assert response.status_code == 200, response.text


def test_error_response_escapes_a_lone_surrogate_it_quotes() -> None:
    response = error_response(ModelNotFound(f"The model `{SURROGATE}` does not exist."))
    error = json.loads(bytes(response.body))["error"]

    assert response.status_code == 404
    assert error["message"] == "The model `\\ud800` does not exist."


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'"a string"',
        b"",
        b"\xff\xfe",
        b'{"prompt": "hi", "stream": true, "temperature": NaN}',
        b"[" * 100_000,
    ],
    ids=lambda raw: repr(raw[:60]),
)
async def test_body_that_is_not_a_json_object_gets_400(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    response = await client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )

    assert_openai_error(response, 400, None)


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 3, "user": "me", "some_future_field": {"x": 1}},
    )

    assert response.status_code == 200


async def test_unknown_model_gets_404_model_not_found(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER})

    assert_openai_error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"


async def test_unknown_route_gets_openai_shaped_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing-here")

    assert_openai_error(response, 404, None)
