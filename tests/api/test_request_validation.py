"""Client mistakes get a 4xx in OpenAI's error shape, never a 5xx or a traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tdllm.api.runner import EngineRunner, Overloaded

from .conftest import MODEL

CHAT = [{"role": "user", "content": "hi"}]


def assert_openai_error(resp: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    doc = resp.get_json()
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert isinstance(doc["error"]["message"], str) and "Traceback" not in doc["error"]["message"]
    if param is not None:
        assert doc["error"]["param"] == param
    error: dict[str, Any] = doc["error"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi"}, "model"),
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": ["a", ""]}, "prompt"),
        ({"model": MODEL, "prompt": [[1, 2], []]}, "prompt"),
        ({"model": MODEL, "prompt": [[1, 2], "a"]}, "prompt"),
        ({"model": MODEL, "prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ({"model": MODEL, "prompt": "hi", "n": 0}, "n"),
        ({"model": MODEL, "prompt": "hi", "n": 5}, "n"),  # over max_batch (4)
        ({"model": MODEL, "prompt": "hi", "logprobs": 5}, "logprobs"),
        ({"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "prompt": "hi", "seed": -1}, "seed"),
        ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, None),
        ({"model": MODEL, "prompt": [1, 99999999]}, "prompt"),
        ({"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
        ({"model": MODEL, "prompt": "word " * 400}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400(
    client: FlaskClient, body: dict[str, Any], param: str | None
) -> None:
    assert_openai_error(client.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ({"model": MODEL, "messages": CHAT, "logprobs": True}, "logprobs"),
        ({"model": MODEL, "messages": CHAT, "top_logprobs": 2}, "logprobs"),  # policy off
        ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": MODEL, "messages": CHAT, "presence_penalty": 3}, "presence_penalty"),
        (
            {"model": MODEL, "messages": CHAT, "max_tokens": 1, "max_completion_tokens": 2},
            "max_completion_tokens",
        ),
    ],
)
def test_bad_chat_requests_are_400(
    client: FlaskClient, body: dict[str, Any], param: str | None
) -> None:
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param)


def test_logprobs_refusal_says_why(client: FlaskClient) -> None:
    body = {"model": MODEL, "messages": CHAT, "logprobs": True}
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert "last layer" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[1, 2]",
        b"\xff\xfe",
        b"null",
        b'"text"',
        b'{"model": "M", "prompt": "\xed\xa0\x80"}',  # a surrogate as UTF-8 bytes (CESU-8)
        b'\xef\xbb\xbf{"model": "M", "prompt": "hi"}',  # a byte-order mark
        b'{"model": "M", "prompt": "a", "prompt": "b"}',
        b"[" * 100_000 + b"]" * 100_000,  # Python's json raises RecursionError
        b'{"model": "M", "prompt": "hi", "temperature": NaN}',
    ],
    ids=["cut", "array", "not UTF-8", "null", "string", "CESU-8", "BOM", "dup", "deep", "NaN"],
)
def test_malformed_bodies_are_400(make_app: Callable[..., Flask], raw: bytes) -> None:
    client = make_app(max_body_bytes=1 << 20).test_client()
    raw = raw.replace(b'"M"', f'"{MODEL}"'.encode())
    resp = client.post("/v1/completions", data=raw, content_type="application/json")
    assert_openai_error(resp, 400)


def test_unknown_model_is_404(client: FlaskClient) -> None:
    body = {"model": "gpt-4", "prompt": "hi"}
    error = assert_openai_error(client.post("/v1/completions", json=body), 404, "model")
    assert error["code"] == "model_not_found"


def test_unknown_route_and_wrong_method_are_openai_errors(client: FlaskClient) -> None:
    assert_openai_error(client.get("/v1/nope"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_oversized_body_is_413(client: FlaskClient) -> None:
    body = {"model": MODEL, "prompt": "x" * 20000}
    error = assert_openai_error(client.post("/v1/completions", json=body), 413)
    assert error["code"] == "request_too_large"


def test_api_keys_are_required_when_configured(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys=("k" * 24,)).test_client()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert_openai_error(client.post("/v1/completions", json=body), 401)
    wrong = {"Authorization": "Bearer " + "x" * 24}
    assert_openai_error(client.post("/v1/completions", json=body, headers=wrong), 401)
    right = {"Authorization": "Bearer " + "k" * 24}
    assert client.post("/v1/completions", json=body, headers=right).status_code == 200
    assert client.get("/health").status_code == 200  # liveness stays open


def test_only_the_exact_public_paths_skip_the_api_key(make_app: Callable[..., Flask]) -> None:
    """A route that merely starts like an exempt one must still ask for the key."""
    client = make_app(api_keys=("k" * 24,)).test_client()
    for path in ("/v1/attestations", "/v1/attestation-admin", "/v1/e2e"):
        assert_openai_error(client.get(path), 401)


def test_full_queue_is_429(
    client: FlaskClient, runner: EngineRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def overloaded(*_: object) -> None:
        raise Overloaded()

    monkeypatch.setattr(runner, "submit_all", overloaded)
    body = {"model": MODEL, "prompt": "hi"}
    error = assert_openai_error(client.post("/v1/completions", json=body), 429)
    assert error["code"] == "rate_limit_exceeded"


def test_runner_refuses_beyond_its_capacity(runner: EngineRunner) -> None:
    from tdllm.engine import SamplingParams

    params = SamplingParams(max_tokens=1)
    handles = []
    with pytest.raises(Overloaded):
        for _ in range(runner.capacity + 1):
            handles.append(runner.submit([1, 2, 3], params))
    for handle in handles:
        list(handle.outputs(60))
    assert runner.outstanding == 0
