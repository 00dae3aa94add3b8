"""The service against its own OpenAPI description (generated: tdllm.api.openapi_document).

schemathesis generates requests from the description, both valid (positive) and invalid
(negative) ones, and sends them to the Flask app in-process: no answer may be a 5xx, and every
answer must have a documented status, content type and body shape. The engine is the session's
bundled model with tight limits, so valid requests really generate (a few tokens) and the file
stays well under a minute. Examples are derandomized: a failure reproduces on every run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tdllm.api.openapi import description

from .conftest import MODEL

MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CASES = [
    pytest.param(path, method.upper(), mode, id=f"{method.upper()} {path} {mode.value}")
    for path, item in description()["paths"].items()
    for method, operation in item.items()
    for mode in GenerationMode
    # a path parameter that is any string cannot be made invalid; no inputs, nothing to negate
    if mode is GenerationMode.POSITIVE or "requestBody" in operation or path == "/v1/attestation"
]


def fuzz_description() -> dict[str, Any]:
    """The served description with `model` narrowed to the one model, so that valid requests
    get past the 404 and into the engine."""
    doc = copy.deepcopy(description())
    for name in (
        "CompletionRequest",
        "ChatCompletionRequest",
        "TokenizeCompletionRequest",
        "TokenizeChatRequest",
        "DetokenizeRequest",
    ):
        doc["components"]["schemas"][name]["properties"]["model"] = {"const": MODEL}
    return doc


def test_served_description_is_the_generated_one(make_app: Callable[..., Flask]) -> None:
    response = make_app().test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json() == description()
    documented = {(p, m.upper()) for p, item in description()["paths"].items() for m in item}
    app = make_app()
    routed = {
        (rule.rule.replace("<path:model>", "{model}"), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert routed == documented


@pytest.mark.parametrize(("path", "method", "mode"), CASES)
def test_no_server_errors_and_answers_conform(
    make_app: Callable[..., Flask], path: str, method: str, mode: GenerationMode
) -> None:
    app = make_app(
        max_prompt_tokens=48,
        max_tokens_limit=3,
        default_max_tokens=2,
        attestation="simulated",  # so /v1/attestation answers 200 rather than a documented 503
        allow_simulated=True,
    )
    schema = schemathesis.openapi.from_dict(fuzz_description())
    schema.app = app
    operation = schema[path][method]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    started = time.monotonic()
    fuzz()
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("role", [[], ["user"], {"role": "user"}, None, 1])
def test_an_unhashable_or_missing_role_is_a_400(client: FlaskClient, role: object) -> None:
    """Regression: a list or object role raised TypeError in the role lookup, a 500."""
    body = {"model": MODEL, "messages": [{"role": role, "content": "hi"}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "messages[0]"
