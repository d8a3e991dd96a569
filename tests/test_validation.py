"""Bad input gets a 400 in OpenAI's error shape, never a 500 or a traceback."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

USER = [{"role": "user", "content": "hi"}]

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
    ("n above one", {"messages": USER, "n": 2}, "n"),
    ("tools", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ("logprobs", {"messages": USER, "logprobs": True}, "logprobs"),
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
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text


@pytest.mark.parametrize(("case", "body", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_request_body_gets_400_with_openai_error(
    client: httpx.AsyncClient, case: str, body: Any, param: str | None
) -> None:
    response = await client.post("/v1/chat/completions", json=body)

    assert_openai_error(response, 400, param)
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'"a string"', b"", b"\xff\xfe"], ids=repr
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
