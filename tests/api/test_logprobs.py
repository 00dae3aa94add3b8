"""Logprobs on the tdllm engine, as the model owner's `logprobs_policy` allows: OpenAI's chat
shape, the legacy completions shape, streamed and whole, and the 400s of asking beyond it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tdllm.api.openai.logprobs import check_logprobs

from .conftest import MODEL
from .sse_frames import parse_sse
from .test_request_validation import assert_openai_error

CHAT = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"model": MODEL, "max_tokens": 8, "temperature": 0}


@pytest.fixture
def allowed(make_app: Callable[..., Flask]) -> FlaskClient:
    """A service whose owner allows the top 5 alternatives per token."""
    return make_app(logprobs_policy="top-k:5").test_client()


def _chat(client: FlaskClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/chat/completions", json=GREEDY | {"messages": CHAT} | body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    answer: dict[str, Any] = resp.get_json()
    return answer


def _completion(client: FlaskClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/completions", json=GREEDY | {"prompt": "The sea is"} | body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    answer: dict[str, Any] = resp.get_json()
    return answer


def test_chat_gives_each_token_its_logprob_bytes_and_top_alternatives(
    allowed: FlaskClient,
) -> None:
    answer = _chat(allowed, logprobs=True, top_logprobs=3)
    (choice,) = answer["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 8
    assert "".join(item["token"] for item in content) == choice["message"]["content"]
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode())
        top = item["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"token", "logprob", "bytes"} for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the chosen token is the most likely one, a probability in (0, 1]
        assert item["token"] == top[0]["token"] and item["logprob"] == top[0]["logprob"]
        assert -math.inf < item["logprob"] <= 0


def test_chat_logprobs_without_top_logprobs_list_no_alternatives(allowed: FlaskClient) -> None:
    content = _chat(allowed, logprobs=True, max_tokens=3)["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(item["top_logprobs"] == [] for item in content)


def test_a_stream_carries_each_tokens_logprobs_once_in_order(allowed: FlaskClient) -> None:
    whole = _chat(allowed, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    body = GREEDY | {"messages": CHAT, "logprobs": True, "top_logprobs": 2, "stream": True}
    events, done = parse_sse(allowed.post("/v1/chat/completions", json=body).get_data(True))
    assert done
    streamed = []
    for event in events:
        (choice,) = event["choices"]
        if choice["logprobs"] is not None:
            streamed += choice["logprobs"]["content"]
            # a chunk's tokens spell its text (nothing held back without a stop string)
            spelled = "".join(item["token"] for item in choice["logprobs"]["content"])
            assert spelled == choice["delta"].get("content", "")
    assert streamed == whole


def test_completions_give_the_legacy_shape_with_the_chosen_token_among_the_top(
    allowed: FlaskClient,
) -> None:
    (choice,) = _completion(allowed, logprobs=2)["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = logprobs["tokens"]
    assert len(tokens) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert "".join(tokens) == choice["text"]
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for token, logprob, top in zip(
        tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert top[token] == logprob and 2 <= len(top) <= 3  # the top 2, and the chosen one


def test_a_streamed_completion_continues_its_text_offsets(allowed: FlaskClient) -> None:
    whole = _completion(allowed, logprobs=1)["choices"][0]["logprobs"]
    body = GREEDY | {"prompt": "The sea is", "logprobs": 1, "stream": True}
    events, _ = parse_sse(allowed.post("/v1/completions", json=body).get_data(True))
    offsets: list[int] = []
    tokens: list[str] = []
    for event in events:
        logprobs = event["choices"][0]["logprobs"]
        tokens += logprobs["tokens"]
        offsets += logprobs["text_offset"]
    assert tokens == whole["tokens"] and offsets == whole["text_offset"]


def test_each_of_n_choices_gets_its_own_tokens_logprobs(allowed: FlaskClient) -> None:
    answer = _chat(allowed, logprobs=True, n=2, temperature=1.0, seed=4, max_tokens=5)
    for choice in answer["choices"]:
        content = choice["logprobs"]["content"]
        assert "".join(item["token"] for item in content) == choice["message"]["content"]


def test_without_logprobs_a_choice_says_null(allowed: FlaskClient) -> None:
    assert _chat(allowed, logprobs=False)["choices"][0]["logprobs"] is None
    assert _completion(allowed)["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("path", "asked"),
    [
        ("/v1/chat/completions", {"logprobs": True}),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 0}),
        ("/v1/chat/completions", {"top_logprobs": 1}),
        ("/v1/completions", {"logprobs": 0}),  # 0 still asks: the chosen token's logprob
        ("/v1/completions", {"logprobs": 1}),
    ],
)
def test_the_default_policy_refuses_logprobs_naming_them(
    client: FlaskClient, path: str, asked: dict[str, Any]
) -> None:
    prompt = {"messages": CHAT} if "chat" in path else {"prompt": "hi"}
    error = assert_openai_error(client.post(path, json=GREEDY | prompt | asked), 400, "logprobs")
    assert error["code"] == "logprobs_refused" and "logprobs_policy" in error["message"]


@pytest.mark.parametrize(
    ("path", "asked", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_asking_beyond_the_policy_or_in_the_wrong_shape_is_one_400_naming_it(
    allowed: FlaskClient, path: str, asked: dict[str, Any], param: str
) -> None:
    prompt = {"messages": CHAT} if "chat" in path else {"prompt": "hi"}
    assert_openai_error(allowed.post(path, json=GREEDY | prompt | asked), 400, param)


def test_the_one_rule_counts_completions_logprobs_zero_as_asking() -> None:
    with pytest.raises(Exception, match="logprobs are off"):
        check_logprobs({"logprobs": 0}, None)
    check_logprobs({"logprobs": 0}, 0)


def test_the_model_card_states_the_policy(client: FlaskClient, allowed: FlaskClient) -> None:
    assert client.get("/v1/models").get_json()["data"][0]["tdllm"]["logprobs"] == "off"
    card = allowed.get(f"/v1/models/{MODEL}").get_json()
    assert card["tdllm"]["logprobs"] == "top-k:5"
