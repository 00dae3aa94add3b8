"""The API's 400s for a prompt the one prompt check refuses: param, code and message."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from .conftest import MODEL

LIMIT = 256  # max_prompt_tokens of the test settings (conftest.api_settings)


def error_of(client: FlaskClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(path, json={"model": MODEL} | body)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error: dict[str, Any] = resp.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_a_completion_prompt_at_the_limit_is_served_one_token_more_is_400(
    client: FlaskClient,
) -> None:
    body = {"prompt": [1] * LIMIT, "max_tokens": 1}
    assert client.post("/v1/completions", json={"model": MODEL} | body).status_code == 200
    error = error_of(client, "/v1/completions", {"prompt": [1] * (LIMIT + 1)})
    assert error["param"] == "prompt"
    assert error["code"] == "context_length_exceeded"
    assert error["message"] == f"the prompt has {LIMIT + 1} tokens; the limit is {LIMIT}"


def test_a_chat_prompt_over_the_limit_names_messages(client: FlaskClient) -> None:
    messages = [{"role": "user", "content": "word " * 400}]
    error = error_of(client, "/v1/chat/completions", {"messages": messages})
    assert error["param"] == "messages"
    assert error["code"] == "context_length_exceeded"
    assert error["message"].endswith(f"tokens; the limit is {LIMIT}")


def test_a_token_id_outside_the_vocabulary_is_400_on_prompt(client: FlaskClient) -> None:
    error = error_of(client, "/v1/completions", {"prompt": [1, 99999999]})
    assert error["param"] == "prompt"
    assert error["code"] is None
    assert error["message"].startswith("token ids must be in [0, ")
