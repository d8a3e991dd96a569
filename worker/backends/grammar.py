"""JSON Schemas → llama.cpp grammars (GBNF), by llama-cpp-python's `json_schema_to_gbnf` (the
converter of llama.cpp's `examples/json-schema-to-grammar.py`, as the pinned 0.3.36 ships it).

That converter silently drops what it cannot express: `minimum` and `maximum`, `multipleOf`,
`uniqueItems`, `not`, `if`/`then`/`else`, `patternProperties`, a `format` other than dates,
times and uuids, `minLength`/`maxLength` without `"type": "string"`, and more. Output that
ignores part of the schema would be worse than a refusal, so `check_supported` refuses a schema
that uses one, with a 400 naming the keyword and where it is. Annotations (`title`,
`description`, `default`, `examples`, ...) constrain nothing and are accepted.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from shared.errors import InvalidRequest

CONSTRAINTS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
    }
)
"""Keywords the converter honours (with the exceptions `_refusal` checks)."""
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4"})
SCHEMA_MAPS = ("properties", "$defs", "definitions")
"""Keywords whose value maps names to schemas."""
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
"""Keywords whose value is a list of schemas."""
MAX_REPEAT = 1000
"""The converter writes a repetition out in full: `"minItems": 10**8` would be a grammar of
10**8 rules, built on the worker's event loop. A count above this is refused."""
COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
PATTERN_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
ANY_JSON = JSON_GBNF
"""`{"type": "json_object"}`: any JSON object."""


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of JSON that fits `schema` (`check_supported` first); 400 naming `param` for
    one the converter cannot take."""
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter's asserts, KeyErrors, ValueErrors: all the schema's
        raise InvalidRequest(
            f"'{param}' cannot be turned into a grammar: {exc}", param=param
        ) from None


def check_supported(schema: Any, param: str) -> None:
    """A 400 naming the first keyword of `schema` (`param`) the converter would not honour."""
    if not isinstance(schema, dict):
        if isinstance(schema, bool):
            raise InvalidRequest(
                f"'{param}': a boolean schema is not supported; use an object", param=param
            )
        return
    for keyword in schema:
        if (refusal := _refusal(schema, keyword)) is not None:
            raise InvalidRequest(
                f"'{param}.{keyword}': {refusal}; llama.cpp's grammar would ignore it",
                param=f"{param}.{keyword}",
            )
    for keyword in SCHEMA_MAPS:
        for name, sub in (schema.get(keyword) or {}).items():
            check_supported(sub, f"{param}.{keyword}.{name}")
    for keyword in SCHEMA_LISTS:
        for n, sub in enumerate(schema.get(keyword) or []):
            check_supported(sub, f"{param}.{keyword}[{n}]")
    items = schema.get("items")
    if isinstance(items, list):
        for n, sub in enumerate(items):
            check_supported(sub, f"{param}.items[{n}]")
    elif items is not None:
        check_supported(items, f"{param}.items")
    if isinstance(extra := schema.get("additionalProperties"), dict):
        check_supported(extra, f"{param}.additionalProperties")


def _refusal(schema: dict[str, Any], keyword: str) -> str | None:
    """Why `keyword` cannot be honoured in `schema`, or None."""
    if keyword in ANNOTATIONS:
        return None
    if keyword not in CONSTRAINTS:
        return f"the keyword '{keyword}' is not supported"
    if keyword in COUNTS and not (
        isinstance(schema[keyword], int) and schema[keyword] <= MAX_REPEAT
    ):
        return f"'{keyword}' above {MAX_REPEAT} is not supported"
    if keyword == "pattern" and any(
        int(n) > MAX_REPEAT
        for m in PATTERN_COUNT.finditer(str(schema["pattern"]))
        for n in m.groups()
        if n
    ):
        return f"a repetition above {MAX_REPEAT} in 'pattern' is not supported"
    if keyword == "format" and schema["format"] not in FORMATS:
        return f"the format {schema['format']!r} is not supported"
    if keyword in ("minLength", "maxLength"):
        if schema.get("type") != "string":
            return f'\'{keyword}\' is supported only with "type": "string"'
        if "pattern" in schema or "format" in schema:
            return f"'{keyword}' is not supported together with 'pattern' or 'format'"
    if keyword == "allOf" and schema.get("type", "object") != "object":
        return "'allOf' is supported only for objects"
    if keyword == "$ref" and not str(schema["$ref"]).startswith("#/"):
        return "only local references ('#/...') are supported"
    return None
