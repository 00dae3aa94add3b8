"""GET /openapi.json: the OpenAPI 3.1 description of this service.

Generated (tdllm.api.openapi_document): the request bodies from the validator's own field
tables, so the document cannot drift from what the service accepts. tests/api/test_openapi_fuzz.py
fuzzes the service against it (no 5xx, answers conform), and tests/api/test_openapi_document.py
holds its paths to the app's routes and its request schemas to the validator.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from tdllm.api import openapi_document

blueprint = Blueprint("openapi", __name__)


@cache
def description() -> dict[str, Any]:
    """The document, built once per process (callers must not mutate it: copy first)."""
    return openapi_document.build()


@blueprint.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return jsonify(description())
