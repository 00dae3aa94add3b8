"""The API's 400s for a prompt the one prompt check refuses: param, code and message."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.api.runner import EngineRunner
from tdllm.engine import Engine

from .conftest import CONTEXT, MODEL, api_settings

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


def test_choices_that_could_outgrow_the_kv_budget_are_400_on_n(runner: EngineRunner) -> None:
    """n choices of a long prompt could together need more KV cache than the engine's budget
    (`kv_cache_tokens`): refused before queuing (it would never be admitted), not left waiting."""
    shared = runner.engine
    budgeted = Engine(shared.model, shared.tokenizer, 4, CONTEXT, kv_tokens=CONTEXT)
    own = EngineRunner(budgeted, model_name=MODEL, queue_size=4).start()
    try:
        client = create_app(api_settings(), engine_runner=own).test_client()
        body = {"prompt": [1] * 200, "max_tokens": 100}
        error = error_of(client, "/v1/completions", body | {"n": 2})
        assert error["param"] == "n"
        assert "kv_cache_tokens" in error["message"]
        assert client.post("/v1/completions", json={"model": MODEL} | body).status_code == 200
    finally:
        own.stop()
