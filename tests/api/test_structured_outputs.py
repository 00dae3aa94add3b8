"""Structured outputs on our engine: response_format json_object and json_schema, decoded under
llguidance's grammar (tdllm.engine.structured), through Flask's test client and the official
`openai` client. Sampled at temperature 1 on the bundled model, every output parses and fits its
schema; the 200-generation sweep of the acceptance is the slow test."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydantic import BaseModel

from tdllm.api.openai.strict_json import MAX_JSON_DEPTH
from tdllm.api.runner import EngineRunner
from tdllm.engine.structured import MAX_SCHEMA_BYTES, Grammars

from .conftest import MODEL
from .sse_frames import parse_sse
from .test_request_validation import assert_openai_error
from .test_sampling_params import openai_client

ASK = [{"role": "user", "content": "Invent a person and answer in JSON."}]
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {
            "type": "array",
            "items": {"enum": ["cat", "dog", "fish"]},
            "maxItems": 3,
        },
        "married": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "married"],
    "additionalProperties": False,
}
SCHEMA_PARAM = "response_format.json_schema.schema"


def json_schema(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema} | extra}


def chat(client: FlaskClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK} | body)
    assert resp.status_code == 200, resp.get_json()
    doc: dict[str, Any] = resp.get_json()
    return doc


def contents(doc: dict[str, Any]) -> list[str]:
    return [c["message"]["content"] for c in doc["choices"]]


def sampled_people(client: FlaskClient, count: int) -> list[tuple[str, str]]:
    """`count` temperature-1 generations under PERSON: (content, finish_reason) each."""
    out = []
    while len(out) < count:
        n = min(4, count - len(out))
        doc = chat(client, response_format=json_schema(PERSON), temperature=1, max_tokens=100, n=n)
        out += [(c["message"]["content"], c["finish_reason"]) for c in doc["choices"]]
    return out


def assert_all_fit(outputs: list[tuple[str, str]], schema: dict[str, Any]) -> None:
    validator = jsonschema_rs.Draft202012Validator(schema)
    bad = [(text, reason) for text, reason in outputs if not _fits(validator, text)]
    assert not bad, f"{len(bad)} of {len(outputs)} do not fit: {bad[:3]}"
    assert {reason for _, reason in outputs} == {"stop"}


def _fits(validator: Any, text: str) -> bool:
    try:
        return bool(validator.is_valid(json.loads(text)))
    except json.JSONDecodeError:
        return False


def test_json_object_output_parses_as_a_json_object(client: FlaskClient) -> None:
    question = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    doc = chat(
        client,
        messages=question,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=128,
    )
    (text,) = contents(doc)
    assert json.loads(text) == {"city": {"capital": "Paris"}}  # compact: no free whitespace
    assert doc["choices"][0]["finish_reason"] == "stop"


def test_text_response_format_is_plain_generation(client: FlaskClient) -> None:
    plain = chat(client, temperature=0, max_tokens=8)
    text = chat(client, response_format={"type": "text"}, temperature=0, max_tokens=8)
    assert contents(plain) == contents(text)


def test_json_schema_outputs_validate_in_every_sampled_generation(client: FlaskClient) -> None:
    assert_all_fit(sampled_people(client, 20), PERSON)


@pytest.mark.slow
def test_json_schema_outputs_validate_in_200_sampled_generations(client: FlaskClient) -> None:
    """The acceptance: 100% of 200 temperature-1 generations parse and fit."""
    assert_all_fit(sampled_people(client, 200), PERSON)


def test_n_choices_each_fit_the_schema(client: FlaskClient) -> None:
    doc = chat(client, response_format=json_schema(PERSON), temperature=1, max_tokens=100, n=2)
    assert [c["index"] for c in doc["choices"]] == [0, 1]
    assert_all_fit([(c["message"]["content"], c["finish_reason"]) for c in doc["choices"]], PERSON)


def test_streamed_deltas_concatenate_to_json_that_fits(client: FlaskClient) -> None:
    body = {
        "model": MODEL,
        "messages": ASK,
        "response_format": json_schema(PERSON, strict=True),
        "temperature": 1,
        "max_tokens": 100,
        "stream": True,
    }
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    chunks, done = parse_sse(resp.get_data(as_text=True))
    assert done
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    assert_all_fit([(text, finish)], PERSON)


def test_masks_of_a_decode_step_are_computed_together(
    make_app: Callable[..., Flask], runner: EngineRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    allowed = Grammars.allowed

    def counting(self: Grammars, matchers: Any) -> Any:
        calls.append(len(matchers))
        return allowed(self, matchers)

    monkeypatch.setattr(Grammars, "allowed", counting)
    chat(
        make_app().test_client(),
        response_format=json_schema(PERSON),
        temperature=1,
        max_tokens=100,
        n=3,
        seed=1,
    )
    assert calls[0] == 3  # the shared prefill's three choices
    assert max(calls) == 3 and len(calls) < 100


@pytest.mark.parametrize(
    ("unusable", "reason"),
    [
        ({"type": "wat"}, "Invalid type: wat"),
        ({"$ref": "#/nope"}, "/nope"),
        ({"type": "string", "pattern": "("}, "unclosed group"),
        ({"type": "object", "x-guidance": {"whitespace_flexible": True}}, "x-guidance"),
        ({"enum": ["x" * 1000] * (MAX_SCHEMA_BYTES // 1000 + 1)}, f"{MAX_SCHEMA_BYTES} bytes"),
    ],
)
def test_an_unusable_schema_is_a_400_naming_it_and_why(
    make_app: Callable[..., Flask], unusable: dict[str, Any], reason: str
) -> None:
    body = {"model": MODEL, "messages": ASK, "response_format": json_schema(unusable)}
    resp = (
        make_app(max_body_bytes=2 * MAX_SCHEMA_BYTES)
        .test_client()
        .post("/v1/chat/completions", json=body)
    )
    error = assert_openai_error(resp, 400, SCHEMA_PARAM)
    assert reason in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ("json", "response_format"),
        ({"type": "yaml"}, "response_format"),
        ({"type": "json_object", "schema": {}}, "response_format.schema"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": {}}},
            "response_format.json_schema.name",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            "response_format.json_schema.name",
        ),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, SCHEMA_PARAM),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": []}}, SCHEMA_PARAM),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "strict": 1}},
            "response_format.json_schema.strict",
        ),
    ],
)
def test_a_malformed_response_format_is_a_400_naming_the_field(
    client: FlaskClient, response_format: Any, param: str
) -> None:
    body = {"model": MODEL, "messages": ASK, "response_format": response_format}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param)


def test_a_schema_nested_past_the_body_limit_is_a_400(client: FlaskClient) -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(MAX_JSON_DEPTH):
        schema = {"type": "array", "items": schema}
    body = {"model": MODEL, "messages": ASK, "response_format": json_schema(schema)}
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert f"more than {MAX_JSON_DEPTH} levels" in error["message"]


# response_format on /v1/completions: tests/api/test_completions_response_format.py


class Person(BaseModel):
    name: str
    age: int
    married: bool


def test_the_openai_client_parses_a_pydantic_response_format(
    make_app: Callable[..., Flask],
) -> None:
    """`chat.completions.parse` sends the model's strict JSON Schema and parses the answer."""
    client = openai_client(make_app())
    # seeded, with room: at temperature 1 a free string can run on, and the client refuses a
    # truncated answer (LengthFinishReasonError: once in `make test` at max_tokens 100, unseeded)
    answer = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Person, temperature=1, max_tokens=128, seed=7
    )
    assert isinstance(answer.choices[0].message.parsed, Person)
    plain = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        temperature=1,
        max_tokens=128,
        seed=7,
    )
    assert_all_fit([(plain.choices[0].message.content or "", "stop")], PERSON)
