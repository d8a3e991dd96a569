"""The OpenAPI document (/openapi.json, /docs) is valid and describes every body, as served."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import create_model

from api.main import create_app
from api.openapi import SluiceAPI, json_body
from shared.settings import Settings

Document = dict[str, Any]
COMPONENTS = "#/components/schemas/"
GENERATION_ROUTES = ["/v1/chat/completions", "/v1/completions"]
OPERATIONS = [
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("get", "/v1/streams/{stream_id}"),
    ("post", "/v1/streams/{stream_id}/cancel"),
]


def ref(name: str) -> dict[str, str]:
    return {"$ref": COMPONENTS + name}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def assert_matches(document: Document, component: str, instance: Any) -> None:
    """`instance` is valid against the document's component schema named `component`."""
    jsonschema.validate(instance, {**ref(component), "components": document["components"]})


@pytest.fixture
async def document(client: httpx.AsyncClient) -> Document:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    body: Document = response.json()
    return body


def test_document_is_valid_openapi_3_1(document: Document) -> None:
    assert document["openapi"].startswith("3.1.")
    validate(document, cls=OpenAPIV31SpecValidator)


def test_served_document_is_the_one_the_app_builds(document: Document) -> None:
    """test_fuzz builds the document in-process, before any API runs."""
    assert document == create_app(Settings(backend="synthetic")).openapi()


def test_every_ref_points_at_a_component_schema(document: Document) -> None:
    schemas = document["components"]["schemas"]
    found = set(refs(document))

    assert found
    assert {r.removeprefix(COMPONENTS) for r in found} <= set(schemas)
    assert all(r.startswith(COMPONENTS) for r in found)


def test_generation_routes_document_their_request_bodies(document: Document) -> None:
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    completions = document["paths"]["/v1/completions"]["post"]["requestBody"]

    assert chat["required"]
    assert completions["required"]
    assert chat["content"]["application/json"]["schema"] == {
        "oneOf": [ref("ChatCompletionRequest"), ref("SeedRequest")]
    }
    assert completions["content"]["application/json"]["schema"] == ref("CompletionRequest")
    schemas = document["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert schemas["SeedRequest"]["required"] == ["prompt", "stream"]
    assert schemas["SeedRequest"]["properties"]["seed"]["anyOf"][0]["maximum"] == 2**64 - 1


@pytest.mark.parametrize(
    ("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS]
)
def test_every_operation_documents_its_answers(document: Document, method: str, path: str) -> None:
    responses = document["paths"][path][method]["responses"]

    assert "422" not in responses  # FastAPI's default: sluice answers 400 instead
    assert all(media["schema"] for media in responses["200"]["content"].values())
    for errors in ("4XX", "5XX"):
        assert responses[errors]["content"] == {
            "application/json": {"schema": ref("ErrorResponse")}
        }


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_generation_answers_json_or_an_event_stream(document: Document, path: str) -> None:
    content = document["paths"][path]["post"]["responses"]["200"]["content"]

    assert set(content) == {"application/json", "text/event-stream"}


async def test_real_answers_match_their_documented_schemas(
    client: httpx.AsyncClient, document: Document
) -> None:
    chat = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    text = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    models = await client.get("/v1/models")
    model = await client.get(f"/v1/models/{models.json()['data'][0]['id']}")
    error = await client.post("/v1/completions", json={"prompt": 1})

    assert_matches(document, "ChatCompletion", chat.json())
    assert_matches(document, "TextCompletion", text.json())
    assert_matches(document, "ModelList", models.json())
    assert_matches(document, "ModelCard", model.json())
    assert_matches(document, "ErrorResponse", error.json())


async def test_docs_page_shows_the_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")

    assert response.status_code == 200
    assert "/openapi.json" in response.text


def test_two_different_body_schemas_of_one_name_are_refused() -> None:
    app = SluiceAPI()
    bodies = {"/a": create_model("Body", text=(str, ...)), "/b": create_model("Body", n=(int, ...))}
    for path, body in bodies.items():
        app.post(path, openapi_extra=json_body(body))(lambda: None)

    with pytest.raises(ValueError, match="'Body'"):
        app.openapi()
