"""GET /openapi.json: the OpenAPI 3.1 description of this service (package data, kept by hand).

tests/api/test_openapi_fuzz.py fuzzes the service against it (no 5xx, answers conform), so a
route or a validation rule that changes without it fails there.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

blueprint = Blueprint("openapi", __name__)


@cache
def description() -> dict[str, Any]:
    """The parsed openapi.json shipped next to this module."""
    doc: dict[str, Any] = json.loads(files("tdllm.api").joinpath("openapi.json").read_text())
    return doc


@blueprint.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return jsonify(description())
