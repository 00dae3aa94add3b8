"""Small builders of the OpenAPI document's JSON Schema and response objects, shared by its
paths (`openapi_paths`) and its components (`openapi_document`)."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
OPEN: list[dict[str, list[str]]] = [{}]  # no key needed
KEYED: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # a key when keys are configured


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, **extra}


def const(kind: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "const": value}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}


def json_body(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def error_body(description: str) -> dict[str, Any]:
    return json_body(description, ref("Error"))


def described(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return schema | {"description": description}


NULLABLE_STRING = nullable(STRING)
