"""Malformed input never becomes a 5xx: every client mistake is a 4xx in OpenAI's error shape.

In-process (Flask test client) for what the app decides: text that is not Unicode (lone
surrogates, also smuggled as CESU-8 bytes), NUL characters, bodies that are not UTF-8, nesting
deep enough to exhaust Python's recursion limit, numbers that overflow or exceed 20 digits, NaN
and Infinity, duplicate keys, and a wrong type in every field of both request schemas (checked
against the OpenAPI description: the service accepts exactly what it documents). The E2E
endpoint applies the same rules to its envelope and to the sealed request. What the HTTP
server decides (chunked framing, slow clients) is `test_http_framing`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema_rs
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flask import Flask
from flask.testing import FlaskClient

from tdllm.api.openapi import description
from tdllm_attest.client.e2e_protocol import ExchangeKeys, open_response, seal_plaintext

from .conftest import MODEL
from .test_request_validation import assert_openai_error

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
E2E = "/v1/e2e/chat/completions"
SECRET = "purple-zebra-of-quillhaven"  # noqa: S105  # prompt text that must never reach a log line


def fill(template: str) -> str:
    """A raw JSON body from a template: "M" is the served model, SECRET the marker text."""
    return template.replace('"M"', f'"{MODEL}"').replace("SECRET", SECRET)


def post(client: FlaskClient, path: str, raw: bytes | str) -> Any:
    data = raw.encode() if isinstance(raw, str) else raw
    return client.post(path, data=data, content_type="application/json")


# -- text that is not Unicode, and NUL ---------------------------------------------------------


def test_rejects_lone_surrogate_in_message_content_with_400(client: FlaskClient) -> None:
    """The reported bug: a lone surrogate reached the tokenizer, whose TypeError was a 500."""
    raw = fill('{"model": "M", "messages": [{"role": "user", "content": "\\ud800"}]}')
    error = assert_openai_error(post(client, CHAT, raw), 400, "messages[0].content")
    assert "surrogate" in error["message"]


# JSON string literals (as they appear in a body) that are not text this service accepts
NOT_TEXT = {
    "lone high surrogate": '"a\\ud800b"',
    "lone low surrogate": '"\\udc00"',
    "reversed pair": '"\\udc00\\ud800"',
    "NUL": '"a\\u0000b"',
}
# (endpoint, param the error names, body with S where the string goes)
STRING_SLOTS = [
    (COMPLETIONS, "prompt", '{"model": "M", "prompt": S}'),
    (COMPLETIONS, "prompt[0]", '{"model": "M", "prompt": [S]}'),
    (COMPLETIONS, "model", '{"model": S, "prompt": "hi"}'),
    (COMPLETIONS, "stop", '{"model": "M", "prompt": "hi", "stop": S}'),
    (COMPLETIONS, "stop[1]", '{"model": "M", "prompt": "hi", "stop": ["x", S]}'),
    (COMPLETIONS, "user", '{"model": "M", "prompt": "hi", "user": S}'),
    (COMPLETIONS, "suffix", '{"model": "M", "prompt": "hi", "suffix": S}'),
    (CHAT, "messages[0].content", '{"model": "M", "messages": [{"role": "user", "content": S}]}'),
    (
        CHAT,
        "messages[1].content[0].text",
        '{"model": "M", "messages": [{"role": "system", "content": "be brief"},'
        ' {"role": "user", "content": [{"type": "text", "text": S}]}]}',
    ),
    (
        CHAT,
        "messages[0].name",
        '{"model": "M", "messages": [{"role": "user", "content": "hi", "name": S}]}',
    ),
    (CHAT, "messages[0].role", '{"model": "M", "messages": [{"role": S, "content": "hi"}]}'),
    (
        CHAT,
        "metadata.tag",
        '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "metadata": {"tag": S}}',
    ),
    (
        CHAT,
        "metadata",
        '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "metadata": {S: "v"}}',
    ),
    (
        CHAT,
        "service_tier",
        '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "service_tier": S}',
    ),
    (CHAT, None, '{"model": "M", "messages": [{"role": "user", "content": "hi"}], S: 1}'),
]


@pytest.mark.parametrize("literal", NOT_TEXT.values(), ids=NOT_TEXT.keys())
@pytest.mark.parametrize(
    ("path", "param", "template"),
    STRING_SLOTS,
    ids=[f"{p.rsplit('/', 1)[1]} {param or 'a key'}" for p, param, _ in STRING_SLOTS],
)
def test_rejects_lone_surrogates_and_nul_in_every_string_with_400(
    client: FlaskClient, path: str, param: str | None, template: str, literal: str
) -> None:
    raw = template.replace("S", literal).replace('"M"', f'"{MODEL}"')
    error = assert_openai_error(post(client, path, raw), 400, param)
    assert "surrogate" in error["message"] or "NUL" in error["message"]


def test_rejects_a_surrogate_smuggled_as_cesu8_bytes_with_400(client: FlaskClient) -> None:
    """ED A0 80 is U+D800 encoded as if it were a character: json.loads(bytes) lets it through
    ('surrogatepass'), strict UTF-8 does not."""
    raw = b'{"model": "%s", "prompt": "\xed\xa0\x80"}' % MODEL.encode()
    error = assert_openai_error(post(client, COMPLETIONS, raw), 400)
    assert "UTF-8" in error["message"]


def test_accepts_valid_astral_text_and_control_characters(client: FlaskClient) -> None:
    """A surrogate *pair* is a real character (U+1F600), and tabs and newlines are text."""
    raw = fill('{"model": "M", "prompt": "smile \\ud83d\\ude00\\t\\n", "max_tokens": 1}')
    assert post(client, COMPLETIONS, raw).status_code == 200


# -- bytes that are not UTF-8 JSON ---------------------------------------------------------------


NOT_UTF8 = {
    "overlong slash": b'{"model": "M", "prompt": "\xc0\xaf"}',
    "overlong three bytes": b'{"model": "M", "prompt": "\xe0\x80\xaf"}',
    "truncated in a string": b'{"model": "M", "prompt": "\xe2\x82"}',
    "truncated at the end": b'{"model": "M", "prompt": "hi"}\xe2\x82',
    "lone continuation byte": b'{"model": "M", "prompt": "\x80"}',
    "not a UTF-8 byte": b'{"model": "M", "prompt": "\xff"}',
    "code point above U+10FFFF": b'{"model": "M", "prompt": "\xf4\x90\x80\x80"}',
    "UTF-16 with a BOM": '{"model": "M", "prompt": "hi"}'.encode("utf-16"),
    "UTF-16 without a BOM": '{"model": "M", "prompt": "hi"}'.encode("utf-16-le"),
    "UTF-32": '{"model": "M", "prompt": "hi"}'.encode("utf-32"),
    "a UTF-8 BOM": b'\xef\xbb\xbf{"model": "M", "prompt": "hi"}',
}


@pytest.mark.parametrize("raw", NOT_UTF8.values(), ids=NOT_UTF8.keys())
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, E2E])
def test_rejects_a_body_that_is_not_utf8_json_with_400(
    client: FlaskClient, path: str, raw: bytes
) -> None:
    raw = raw.replace(b'"M"', b'"' + MODEL.encode() + b'"')
    assert_openai_error(post(client, path, raw), 400)


# -- nesting, numbers, constants, duplicate keys -------------------------------------------------


@pytest.mark.parametrize("depth", [33, 1000, 100_000], ids=["33", "1000", "100000"])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, E2E])
def test_rejects_deep_nesting_with_400_not_a_recursion_error(
    make_app: Callable[..., Flask], path: str, depth: int
) -> None:
    """100 000 brackets are 200 kB, well under the default 1 MiB body limit."""
    client = make_app(max_body_bytes=1 << 20).test_client()
    raw = '{"model": "M", "metadata": ' + "[" * depth + "]" * depth + "}"
    assert "nest" in assert_openai_error(post(client, path, raw), 400)["message"]


@pytest.mark.parametrize("levels", [32, 33])
def test_the_nesting_bound_is_exactly_32_levels(client: FlaskClient, levels: int) -> None:
    """The body is level 1; `metadata` holds the rest. At 32 the body parses (and metadata is
    then refused for its type); at 33 the nesting itself is refused."""
    inner = levels - 1
    raw = fill('{"model": "M", "messages": [], "metadata": ' + "[" * inner + "]" * inner + "}")
    message = assert_openai_error(post(client, CHAT, raw), 400)["message"]
    assert ("nests more than 32" in message) == (levels > 32), message


def test_accepts_the_deepest_request_a_client_needs(client: FlaskClient) -> None:
    """body > messages > message > content > part > text: five levels, far below the bound."""
    part = {"type": "text", "text": "hi"}
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}
    assert client.post(CHAT, json=body).status_code == 200


NUMBERS = {
    "1e400 (overflows to inf)": ("temperature", "1e400"),
    "-1e400": ("top_p", "-1e400"),
    "NaN token": ("temperature", "NaN"),
    "Infinity token": ("top_p", "Infinity"),
    "-Infinity token": ("presence_penalty", "-Infinity"),
    "10**5000 (over the int-string limit)": ("max_tokens", "1" + "0" * 5000),
    "21-digit integer": ("seed", "1" + "0" * 20),
    "21-digit negative integer": ("max_tokens", "-1" + "0" * 20),
    "1e400 in metadata": ("metadata", '{"a": 1e400}'),
    "NaN in logit_bias": ("logit_bias", '{"1": NaN}'),
}


@pytest.mark.parametrize(("field", "literal"), NUMBERS.values(), ids=NUMBERS.keys())
def test_rejects_huge_and_non_finite_numbers_with_400(
    client: FlaskClient, field: str, literal: str
) -> None:
    raw = fill('{"model": "M", "messages": [{"role": "user", "content": "hi"}], "F": V}')
    raw = raw.replace('"F": V', f'"{field}": {literal}')
    param = assert_openai_error(post(client, CHAT, raw), 400)["param"]
    assert param is not None and param.startswith(field)


def test_rejects_a_4000_digit_token_id_with_400(client: FlaskClient) -> None:
    raw = fill('{"model": "M", "prompt": [1' + "0" * 4000 + "]}")
    assert_openai_error(post(client, COMPLETIONS, raw), 400, "prompt[0]")


def test_rejects_duplicate_keys_with_400(client: FlaskClient) -> None:
    """Two `model`s: a proxy reading the first and the service the last must not disagree."""
    raw = fill('{"model": "other", "model": "M", "prompt": "hi", "max_tokens": 1}')
    error = assert_openai_error(post(client, COMPLETIONS, raw), 400)
    assert "duplicate" in error["message"]


# -- a wrong type in every field -----------------------------------------------------------------

# JSON values of every type; the description decides which each field accepts
VALUES: list[Any] = [None, True, False, 0, 1, -1, 1.5, "", "text", [], ["text"], [1], {}, {"a": 1}]
NOT_SERVED = "a-model-this-service-does-not-serve"  # valid requests stop at the 404, no tokens


@functools.cache
def _schemas() -> dict[str, Any]:
    components = description()["components"]
    return {
        path: {"$ref": f"#/components/schemas/{name}", "components": components}
        for path, name in ((COMPLETIONS, "CompletionRequest"), (CHAT, "ChatCompletionRequest"))
    }


def _fields() -> Iterator[Any]:
    """(endpoint, field, one body per value of VALUES) for every documented request field."""
    base = {
        COMPLETIONS: {"model": NOT_SERVED, "prompt": "hi"},
        CHAT: {"model": NOT_SERVED, "messages": [{"role": "user", "content": "hi"}]},
    }
    schemas = description()["components"]["schemas"]
    for path, name in ((COMPLETIONS, "CompletionRequest"), (CHAT, "ChatCompletionRequest")):
        for field in schemas[name]["properties"]:
            extra = {"stream": True} if field == "stream_options" else {}
            bodies = [base[path] | extra | {field: value} for value in VALUES]
            yield pytest.param(path, bodies, id=f"{path} {field}")
    message = base[CHAT]["messages"][0]
    for field in ("role", "content", "name"):
        bodies = [base[CHAT] | {"messages": [message | {field: v}]} for v in VALUES]
        yield pytest.param(CHAT, bodies, id=f"{CHAT} messages[0].{field}")
    for field in ("type", "text"):
        parts = [{"type": "text", "text": "hi"} | {field: v} for v in VALUES]
        bodies = [base[CHAT] | {"messages": [{"role": "user", "content": [p]}]} for p in parts]
        yield pytest.param(CHAT, bodies, id=f"{CHAT} messages[0].content[0].{field}")


@pytest.mark.parametrize(("path", "bodies"), list(_fields()))
def test_validation_accepts_exactly_what_the_description_accepts(
    make_app: Callable[..., Flask], path: str, bodies: list[dict[str, Any]]
) -> None:
    """Each JSON type in each field: a value the OpenAPI description refuses is a 400 in
    OpenAI's shape; one it allows passes validation and reaches the model check (a 404, since
    the model named is not served, so nothing is generated). The description documents the
    widest logprobs policy; a narrower one refuses more (tests/api/test_logprobs.py)."""
    client = make_app(logprobs_policy="top-k:20").test_client()
    validator = jsonschema_rs.Draft202012Validator(_schemas()[path])
    wrong = []
    for body in bodies:
        documented = validator.is_valid(body)
        response = client.post(path, json=body)
        if response.status_code != (404 if documented else 400):
            wrong.append((body, response.status_code, response.get_data(as_text=True)))
        else:
            assert_openai_error(response, response.status_code)
    assert not wrong


# -- the E2E endpoint: its envelope, and the request inside -------------------------------------


def _seal_raw(app: Flask, plaintext: bytes) -> tuple[dict[str, str], ExchangeKeys]:
    """An envelope around exactly these plaintext bytes (seal_request would re-encode them)."""
    identity = app.extensions["tdllm"].identity
    public = identity.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return seal_plaintext(public, plaintext)


def _sealed_answer(app: Flask, request_json: bytes) -> tuple[int, Any]:
    envelope, keys = _seal_raw(app, b'{"api_key": null, "request": ' + request_json + b"}")
    response = app.test_client().post(E2E, json=envelope)
    assert response.status_code == 200, response.get_data(as_text=True)
    signing = app.extensions["tdllm"].identity.signing_key.public_key()
    return open_response(keys, signing.public_bytes(Encoding.Raw, PublicFormat.Raw), response.json)


SEALED = {
    "lone surrogate in content": (
        b'{"model": "M", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages[0].content",
    ),
    "CESU-8 surrogate bytes": (
        b'{"model": "M", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        "messages[0].content",
    ),
    "NUL in content": (
        b'{"model": "M", "messages": [{"role": "user", "content": "a\\u0000"}]}',
        "messages[0].content",
    ),
    "nested 900 deep": (
        b'{"model": "M", "messages": [], "metadata": ' + b"[" * 900 + b"]" * 900 + b"}",
        "metadata",
    ),
    "NaN": (b'{"model": "M", "messages": [], "temperature": NaN}', "temperature"),
    "21-digit integer": (b'{"model": "M", "messages": [], "seed": 1' + b"0" * 20 + b"}", "seed"),
}


@pytest.mark.parametrize(("request_json", "param"), SEALED.values(), ids=SEALED.keys())
def test_e2e_refuses_a_malformed_sealed_request_with_a_sealed_400(
    make_app: Callable[..., Flask], request_json: bytes, param: str
) -> None:
    app = make_app(max_body_bytes=1 << 20)
    status, body = _sealed_answer(app, request_json.replace(b'"M"', f'"{MODEL}"'.encode()))
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param


@pytest.mark.parametrize(
    "raw",
    [
        b'{"enc": "\\ud800", "ciphertext": "AA"}',
        b'{"enc": "AA", "ciphertext": "AA", "enc": "AA"}',
        b'{"enc": 1e400, "ciphertext": "AA"}',
        b'{"enc": ' + b"[" * 5000 + b"]" * 5000 + b', "ciphertext": "AA"}',
    ],
    ids=["surrogate", "duplicate key", "1e400", "deep"],
)
def test_e2e_refuses_a_malformed_envelope_in_clear_with_400(
    make_app: Callable[..., Flask], raw: bytes
) -> None:
    response = post(make_app(max_body_bytes=1 << 20).test_client(), E2E, raw)
    assert assert_openai_error(response, 400)["code"] == "e2e_decrypt_failed"


# -- logs ----------------------------------------------------------------------------------------


def test_malformed_requests_log_one_line_each_without_prompt_or_traceback(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_app(max_body_bytes=1 << 20).test_client()
    bodies = [
        fill('{"model": "M", "prompt": "SECRET \\ud800"}'),
        fill('{"model": "M", "messages": [{"role": "user", "content": "SECRET\\u0000"}]}'),
        fill('{"model": "M", "prompt": "SECRET", "metadata": ' + "[" * 5000 + "]" * 5000 + "}"),
        fill('{"model": "M", "prompt": "SECRET", "seed": 1' + "0" * 5000 + "}"),
    ]
    with caplog.at_level(logging.DEBUG):
        for path in (COMPLETIONS, CHAT):
            for raw in bodies:
                assert post(client, path, raw).status_code == 400
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text
    assert "Traceback" not in text and "unhandled" not in text
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
