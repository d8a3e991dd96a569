"""The OpenAPI document (`/openapi.json`, `/docs`), with the bodies that routes read themselves.

The generation routes read raw JSON so that a bad body gets an OpenAI-shaped 400 naming the
parameter; FastAPI then knows no request body for them, so each route describes its body from
the pydantic models with `json_body`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.errors import QueueFull
from shared.schema import ErrorResponse

Responses = dict[int | str, dict[str, Any]]

COMPONENT_REF = "#/components/schemas/{model}"
SCHEMAS_EXTENSION = "x-component-schemas"
EVENT_STREAM = {"schema": {"type": "string"}}

ERRORS: Responses = {
    "4XX": {
        "model": ErrorResponse,
        "description": "The request is invalid, or names a model or stream that does not exist",
    },
    "5XX": {
        "model": ErrorResponse,
        "description": "No Redis or no worker to serve the request, or a failure in sluice",
    },
}


def json_body(*models: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself: a body that is one of `models`.

    The schemas the models need travel in an extension field, which `SluiceAPI.openapi` moves to
    `components/schemas`, where the `$ref`s point. FastAPI leaves an extension as it is, where it
    would turn the integers of a schema into floats (the largest `seed`, 2**64 - 1, loses its 1).
    """
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=COMPONENT_REF)
    options = [refs[(m, "validation")] for m in models]
    schema = options[0] if len(options) == 1 else {"oneOf": options}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        SCHEMAS_EXTENSION: defs["$defs"],
    }


def generated(completion: type[BaseModel], chunk: str) -> Responses:
    """A generation route's answers besides the errors every route has."""
    return {
        200: {
            "model": completion,
            "description": (
                f"The `{completion.__name__}` object; with `stream: true`, an event stream "
                f"instead: `data:` lines each holding a `{chunk}` chunk (or, if generation "
                "fails, an error envelope), then `data: [DONE]`"
            ),
            "content": {"text/event-stream": EVENT_STREAM},
        },
        QueueFull.status: {
            "model": ErrorResponse,
            "description": "The queue is full; try again after `Retry-After` seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    }


class SluiceAPI(FastAPI):
    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = _finish(super().openapi())
        return self.openapi_schema


def _finish(document: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    for path in document["paths"].values():
        for operation in path.values():
            # A request FastAPI finds invalid gets sluice's 400 (api.errors), never a 422.
            operation["responses"].pop("422", None)
            for name, schema in operation.pop(SCHEMAS_EXTENSION, {}).items():
                if schemas.setdefault(name, schema) != schema:
                    raise ValueError(f"two different schemas are named {name!r}")
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document
