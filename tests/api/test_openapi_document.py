"""The generated OpenAPI document (tdllm.api.openapi_document) cannot drift from the service.

It is valid OpenAPI 3.1 whose schemas are valid JSON Schema (draft 2020-12) and whose $refs
resolve; it documents exactly the routes the app registers; and its request schemas accept
exactly what the validator (tdllm.api.openai.protocol) accepts: the same fields, and for each
field the same values, probed without the Flask app (tests/api/test_malformed_input.py does it
through the app, and tests/api/test_openapi_fuzz.py fuzzes the app against the whole document).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask

from tdllm.api import openapi_document
from tdllm.api.errors import ApiError
from tdllm.api.openai import chat_messages, json_schema, request_fields
from tdllm.api.openai.protocol import (
    conforms,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from tdllm.api.openai.request_fields import (
    CHAT_FIELDS,
    CHAT_SPECS,
    COMPLETION_FIELDS,
    COMPLETION_SPECS,
    DETOKENIZE_FIELDS,
    DETOKENIZE_SPECS,
    TOKENIZE_CHAT_FIELDS,
    TOKENIZE_CHAT_SPECS,
    TOKENIZE_COMPLETION_FIELDS,
    TOKENIZE_COMPLETION_SPECS,
    FieldSpec,
)
from tdllm.api.openapi import description

ENDPOINTS = {
    "completions": ("CompletionRequest", COMPLETION_SPECS, parse_completion),
    "chat": ("ChatCompletionRequest", CHAT_SPECS, parse_chat),
    # /tokenize takes either body (its schema is oneOf the two): one parser, two tables
    "tokenize prompt": ("TokenizeCompletionRequest", TOKENIZE_COMPLETION_SPECS, parse_tokenize),
    "tokenize messages": ("TokenizeChatRequest", TOKENIZE_CHAT_SPECS, parse_tokenize),
    "detokenize": ("DetokenizeRequest", DETOKENIZE_SPECS, parse_detokenize),
}
ALL_FIELDS = (
    CHAT_FIELDS | COMPLETION_FIELDS | TOKENIZE_COMPLETION_FIELDS | TOKENIZE_CHAT_FIELDS
) | DETOKENIZE_FIELDS
CHAT = [{"role": "user", "content": "hi"}]
BASES: dict[str, dict[str, Any]] = {
    "completions": {"model": "m", "prompt": "hi"},
    "chat": {"model": "m", "messages": CHAT},
    "tokenize prompt": {"model": "m", "prompt": "hi"},
    "tokenize messages": {"model": "m", "messages": CHAT},
    "detokenize": {"model": "m", "tokens": [1, 2]},
}
# JSON values of every type, and shapes near the edges of the request fields. No float with an
# integral value: JSON Schema's "integer" takes 1.0, the validator does not (test below).
VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    2,
    3,
    -1,
    0.5,
    1.5,
    2.5,
    -0.5,
    2**63 - 1,
    2**63,
    "",
    "text",
    "none",
    "system",
    "developer",
    "wizard",
    [],
    [""],
    ["x"],
    ["text"],
    ["text", "text"],
    ["a", "b", "c", "d"],
    ["a", "b", "c", "d", "e"],
    [0],
    [1, 2],
    [-1],
    [True],
    [[1]],
    [[]],
    [["a"]],
    [[1], [2]],
    [{"type": "function"}],
    {},
    {"a": 1},
    {"a": "b"},
    {"type": "text"},
    {"type": "json_object"},
    {"type": "text", "x": 1},
    {"5": 1.5},
    {"5": -100},
    {"5": 101},
    {"5": True},
    {"05": 2, "6": -0.5},
    {"12\n": 1},
    {"include_usage": True},
    {"include_usage": 1},
    {"include_usage": None},
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a", "extra": 1}]}],
    [{"role": "user", "content": [{"type": "image_url"}]}],
    [{"role": "bot", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": "hi", "name": 1}],
    [{"role": "user", "content": "hi", "tool_calls": []}],
    [{"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
    [{"role": "tool", "content": "sunny"}],
    [{"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "f"}],
    [{"role": "assistant", "tool_calls": []}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}],
    [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ],
    [{"role": "user", "content": None}],
    [{"type": "function", "function": {"name": "f"}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    [{"type": "function", "function": {"name": "f", "strict": True, "description": "d"}}],
    [{"type": "function", "function": {"name": "no spaces"}}],
    [{"type": "function", "function": {"name": "f", "parameters": []}}],
    [{"type": "function", "function": {"name": "f"}, "extra": 1}],
    {"type": "function", "function": {"name": "f"}},
    {"type": "function", "function": {"name": "f", "x": 1}},
    {"type": "function"},
]


def _schema(name: str) -> dict[str, Any]:
    """A component with the document's components beside it, so that its $refs resolve."""
    return {"$ref": f"#/components/schemas/{name}", "components": description()["components"]}


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


# -- a valid OpenAPI 3.1 document -----------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    definitions = pytest.importorskip("schemathesis.specs.openapi.definitions")
    doc = description()
    assert doc["openapi"].startswith("3.1.")
    validator = jsonschema_rs.Draft202012Validator(definitions.OPENAPI_31)
    errors = [str(e) for e in validator.iter_errors(doc)]
    assert not errors
    assert json.loads(json.dumps(doc)) == doc  # plain JSON: served as is by jsonify


def test_every_schema_is_json_schema_and_every_ref_resolves() -> None:
    doc = description()
    schemas = doc["components"]["schemas"]
    for name, schema in schemas.items():
        assert jsonschema_rs.meta.is_valid(schema), name
        jsonschema_rs.Draft202012Validator(_schema(name))  # compiles: its $refs resolve
    refs = {n["$ref"] for n in _walk(doc) if isinstance(n, dict) and "$ref" in n}
    assert refs == {f"#/components/schemas/{name}" for name in schemas}  # none dead either


def test_build_returns_an_unshared_copy() -> None:
    doc = openapi_document.build()
    assert doc == description()
    doc["components"]["schemas"]["CompletionRequest"]["properties"].clear()
    doc["paths"]["/v1/models"]["get"]["responses"]["401"]["description"] = "changed"
    assert openapi_document.build() == description()
    assert description()["paths"]["/v1/models/{model}"]["get"]["responses"]["401"][
        "description"
    ].startswith("missing or wrong API key")


# -- the routes -----------------------------------------------------------------------------------


def test_the_document_has_exactly_the_routes_of_the_app(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    routed = {
        (rule.rule.replace("<path:model>", "{model}"), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    documented = {
        (path, method) for path, item in description()["paths"].items() for method in item
    }
    assert {r for r in routed if r[0].startswith("/v1/")} == {
        d for d in documented if d[0].startswith("/v1/")
    }
    assert routed == documented


def test_every_request_body_is_a_component_with_no_unknown_fields() -> None:
    schemas = description()["components"]["schemas"]
    for item in description()["paths"].values():
        for operation in item.values():
            if "requestBody" not in operation:
                continue
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            body = schemas[ref.rsplit("/", 1)[1]]
            # /tokenize: one of two bodies, each such a component
            alternatives = [schemas[r["$ref"].rsplit("/", 1)[1]] for r in body.get("oneOf", [])]
            for one in alternatives or [body]:
                assert one["type"] == "object" and one["additionalProperties"] is False, ref


# -- the request schemas are the validator's tables -------------------------------------------


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_the_schema_has_exactly_the_fields_the_validator_accepts(endpoint: str) -> None:
    """Ask the validator itself, field by field: a documented field is never 'unrecognized',
    and every other name a client might send is."""
    name, specs, parse = ENDPOINTS[endpoint]
    documented = set(description()["components"]["schemas"][name]["properties"])
    candidates = ALL_FIELDS | {"bogus", "Model", "max_token", "tool_calls", "chat_template"}
    accepted = set()
    for field in candidates:
        try:
            parse(BASES[endpoint] | {field: None})
            accepted.add(field)
        except ApiError as error:
            if not error.message.startswith("unrecognized request argument"):
                accepted.add(field)
    assert accepted == documented
    assert documented == {spec.name for spec in specs}
    required = set(description()["components"]["schemas"][name]["required"])
    assert required == {spec.name for spec in specs if spec.required}


def _probes() -> Iterator[Any]:
    for endpoint, (_name, specs, _parse) in ENDPOINTS.items():
        for spec in specs:
            # fields valid only beside another: stream_options with stream, a named tool_choice
            # with the tool it names, top_logprobs with logprobs: true
            extra = {"stream": True} if spec.name == "stream_options" else {}
            if spec.name == "tool_choice":
                extra = {"tools": [{"type": "function", "function": {"name": "f"}}]}
            if spec.name == "top_logprobs":
                extra = {"logprobs": True}
            values = [*VALUES, *_edges(spec)]
            bodies = [BASES[endpoint] | extra | {spec.name: v} for v in values]
            without = {k: v for k, v in BASES[endpoint].items() if k != spec.name}
            yield pytest.param(endpoint, [*bodies, without], id=f"{endpoint} {spec.name}")
    message = BASES["chat"]["messages"][0]
    for field in ("role", "content", "name"):
        bodies = [BASES["chat"] | {"messages": [message | {field: v}]} for v in VALUES]
        yield pytest.param("chat", bodies, id=f"chat messages[0].{field}")


def _edges(spec: FieldSpec) -> list[Any]:
    """Values at and past each bound of the spec's schema (and any schema inside it)."""
    out: list[Any] = []
    for node in _walk(spec.schema):
        if not isinstance(node, dict):
            continue
        for key in ("minimum", "maximum", "exclusiveMinimum"):
            if key in node:
                bound = node[key]
                out += [bound, bound - 1, bound + 1, bound - 0.5, bound + 0.5]
        for key in ("const",):
            if key in node:
                out.append(node[key])
        if "enum" in node:
            out += node["enum"]
        for key in ("maxItems", "minItems"):
            if key in node:
                out += [["x"] * node[key], ["x"] * (node[key] + 1), [1] * (node[key] + 1)]
    return [v for v in out if not (isinstance(v, float) and v.is_integer())]


@pytest.mark.parametrize(("endpoint", "bodies"), list(_probes()))
def test_the_validator_accepts_exactly_what_the_schema_accepts(
    endpoint: str, bodies: list[dict[str, Any]]
) -> None:
    name, _specs, parse = ENDPOINTS[endpoint]
    validator = jsonschema_rs.Draft202012Validator(_schema(name))
    wrong = []
    for body in bodies:
        try:
            parse(body)
            accepted = True
        except ApiError as error:
            assert error.status == 400 and error.param is not None
            accepted = False
        if accepted != validator.is_valid(body):
            wrong.append((body, accepted))
    assert not wrong


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(spec, id=f"{endpoint} {spec.name}")
        for endpoint, (_name, specs, _parse) in ENDPOINTS.items()
        for spec in specs
    ],
)
def test_conforms_reads_each_schema_as_json_schema_does(spec: FieldSpec) -> None:
    """The generic check (`conforms`) and a real JSON Schema validator agree on every field."""
    validator = jsonschema_rs.Draft202012Validator(spec.schema)
    for value in [*VALUES, *_edges(spec)]:
        assert conforms(spec.schema, value) == validator.is_valid(value), value


@pytest.mark.parametrize(
    ("field", "value"), [("max_tokens", 2.0), ("n", 1.0), ("seed", 1.0), ("best_of", 1.0)]
)
def test_an_integral_float_is_not_an_integer(field: str, value: float) -> None:
    """The one place the validator is stricter than its JSON Schema: 'integer' in JSON Schema
    takes 1.0; the validator takes ints only, as it always has (a client sends 1, not 1.0)."""
    spec = next(s for s in COMPLETION_SPECS if s.name == field)
    assert jsonschema_rs.Draft202012Validator(spec.schema).is_valid(value)
    assert not conforms(spec.schema, value)
    with pytest.raises(ApiError):
        parse_completion(BASES["completions"] | {field: value})


def test_conforms_refuses_a_keyword_it_does_not_read() -> None:
    with pytest.raises(ValueError, match="format"):
        conforms({"type": "string", "format": "email"}, "a")


@pytest.mark.parametrize("key", ["0", "12", "0123456789", "", "12345678901", "1a", "12\n", "-1"])
def test_conforms_reads_a_pattern_as_json_schema_does(key: str) -> None:
    """JSON Schema's patterns are ECMA-262's: ``$`` is the end of the text (Python's ``$`` also
    matches before a final newline, so a key "12\\n" would have passed)."""
    schema = {"propertyNames": {"pattern": request_fields.ID_KEY_PATTERN}}
    expected = jsonschema_rs.Draft202012Validator(schema).is_valid({key: 1})
    assert conforms(schema, {key: 1}) == expected


def _keywords(schema: dict[str, Any]) -> Iterator[str]:
    """The JSON Schema keywords used in `schema` and the schemas inside it."""
    yield from schema
    for key, arg in schema.items():
        if key == "anyOf":
            for sub in arg:
                yield from _keywords(sub)
        elif key == "properties":
            for sub in arg.values():
                yield from _keywords(sub)
        elif key in ("items", "additionalProperties", "propertyNames") and isinstance(arg, dict):
            yield from _keywords(arg)


def test_every_keyword_of_the_request_schemas_is_one_conforms_reads() -> None:
    """So that the generic check never meets a keyword it would refuse at request time."""
    read = {*json_schema._KEYWORDS, "additionalProperties", "description"}
    for _name, specs, _parse in ENDPOINTS.values():
        for spec in specs:
            assert set(_keywords(spec.schema)) <= read, spec.name
    shapes = chat_messages.MESSAGE_SCHEMA["anyOf"]
    assert chat_messages.MESSAGE_FIELDS == {k for shape in shapes for k in shape["properties"]}
