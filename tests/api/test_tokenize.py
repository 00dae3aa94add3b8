"""POST /tokenize and /detokenize (vLLM's shapes) and /v1/models' max_model_len.

On the bundled model through the app's test client (the official `openai` client has no
tokenize call): counts agree with what the generating endpoints report, the round trip gives the
text back, every client mistake is a 4xx in OpenAI's error shape, nothing reaches the logs. On
the vllm engine: `test_tokenize_on_vllm`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tdllm.api.runner import EngineRunner
from tdllm.model.tokenizer import Tokenizer

from .conftest import CONTEXT, MODEL
from .test_request_validation import assert_openai_error

QUESTION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]
TEXT = "The three primary colors are red, yellow and blue. Ünïcödé ✓ 12345"
API_KEY = "tokenize-test-key-0123456789"
VOCAB = 49152  # the bundled SmolLM2's


def ok_json(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body: dict[str, Any] = resp.get_json()
    return body


def _tokenize(client: FlaskClient, **body: Any) -> dict[str, Any]:
    return ok_json(client.post("/tokenize", json={"model": MODEL} | body))


def _detokenize(client: FlaskClient, tokens: list[int]) -> str:
    body = ok_json(client.post("/detokenize", json={"model": MODEL, "tokens": tokens}))
    prompt: str = body["prompt"]
    return prompt


# -- the answers ------------------------------------------------------------------------------


def test_tokenize_answers_vllms_shape_and_detokenize_gives_the_text_back(
    client: FlaskClient,
) -> None:
    answer = _tokenize(client, prompt=TEXT)
    assert list(answer) == ["count", "max_model_len", "tokens", "token_strs"]
    assert answer["count"] == len(answer["tokens"]) > 10
    assert answer["max_model_len"] == CONTEXT
    assert answer["token_strs"] is None
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in answer["tokens"])
    assert _detokenize(client, answer["tokens"]) == TEXT


def test_tokenize_counts_a_text_prompt_as_completions_does(client: FlaskClient) -> None:
    answer = _tokenize(client, prompt=TEXT)
    completion = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": TEXT, "max_tokens": 1}
    )
    assert ok_json(completion)["usage"]["prompt_tokens"] == answer["count"]
    # the same ids as a completion prompt: the same count again
    by_ids = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": answer["tokens"], "max_tokens": 1}
    )
    assert ok_json(by_ids)["usage"]["prompt_tokens"] == answer["count"]


def test_tokenize_chat_messages_applies_the_template(
    client: FlaskClient, runner: EngineRunner
) -> None:
    answer = _tokenize(client, messages=QUESTION)
    tokenizer = runner.engine.tokenizer
    assert answer["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(QUESTION))
    text = _detokenize(client, answer["tokens"])  # special tokens kept, as in vLLM
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")  # add_generation_prompt defaults to true
    chat = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 1, "temperature": 0},
    )
    assert ok_json(chat)["usage"]["prompt_tokens"] == answer["count"]


def test_tokenize_chat_without_the_generation_prompt_ends_at_the_last_message(
    client: FlaskClient,
) -> None:
    with_prompt = _tokenize(client, messages=QUESTION)
    without = _tokenize(client, messages=QUESTION, add_generation_prompt=False)
    assert with_prompt["tokens"][: without["count"]] == without["tokens"]
    assert without["count"] < with_prompt["count"]
    assert _detokenize(client, without["tokens"]).endswith("France?<|im_end|>\n")


def test_tokenize_chat_takes_text_parts_and_developer_messages_as_chat_does(
    client: FlaskClient,
) -> None:
    parts = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    assert (
        _tokenize(client, messages=parts)["tokens"]
        == _tokenize(client, messages=QUESTION)["tokens"]
    )


def test_tokenize_returns_the_token_strings_when_asked(
    client: FlaskClient, runner: EngineRunner
) -> None:
    answer = _tokenize(client, prompt="Hello world", return_token_strs=True)
    assert answer["token_strs"] == ["Hello", "Ġworld"]  # byte-level BPE: Ġ is the space
    tokenizer = runner.engine.tokenizer
    assert answer["token_strs"] == [tokenizer.token_text(t) for t in answer["tokens"]]


def test_tokenize_an_empty_prompt_is_zero_tokens(client: FlaskClient) -> None:
    answer = _tokenize(client, prompt="")
    assert (answer["count"], answer["tokens"]) == (0, [])
    assert _detokenize(client, []) == ""


def test_tokenize_without_a_model_means_the_served_one(client: FlaskClient) -> None:
    named = _tokenize(client, prompt=TEXT)
    for body in ({"prompt": TEXT}, {"prompt": TEXT, "model": None}):
        assert ok_json(client.post("/tokenize", json=body)) == named
    assert ok_json(client.post("/detokenize", json={"tokens": named["tokens"]}))["prompt"] == TEXT


def test_add_special_tokens_adds_the_bos_the_models_tokenizer_adds(
    runner: EngineRunner,
) -> None:
    """The bundled tokenizer adds no BOS, so the switch changes nothing on it (the API passes
    it through); a tokenizer that adds one adds it only when asked."""
    bundled = runner.engine.tokenizer
    assert not bundled.add_bos
    with_bos = Tokenizer(
        bundled.backend,
        bos_token_id=bundled.bos_token_id,
        eos_token_id=bundled.eos_token_id,
        chat_template=bundled.chat_template,
        add_bos=True,
    )
    plain = bundled.encode(TEXT)
    assert with_bos.encode(TEXT) == [bundled.bos_token_id, *plain]
    assert with_bos.encode(TEXT, add_special_tokens=False) == plain


def test_add_special_tokens_is_accepted_on_both_bodies(client: FlaskClient) -> None:
    text = _tokenize(client, prompt=TEXT)["tokens"]
    assert _tokenize(client, prompt=TEXT, add_special_tokens=False)["tokens"] == text
    chat = _tokenize(client, messages=QUESTION)["tokens"]
    assert _tokenize(client, messages=QUESTION, add_special_tokens=True)["tokens"] == chat


def test_models_card_states_the_engines_max_model_len(client: FlaskClient) -> None:
    card = ok_json(client.get("/v1/models"))["data"][0]
    assert card["max_model_len"] == CONTEXT == _tokenize(client, prompt="x")["max_model_len"]
    assert ok_json(client.get(f"/v1/models/{MODEL}"))["max_model_len"] == CONTEXT


# -- authentication, privacy, drain ---------------------------------------------------------


def test_tokenize_and_detokenize_need_the_api_key(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys=(API_KEY,)).test_client()
    bodies = {"/tokenize": {"model": MODEL, "prompt": "hi"}, "/detokenize": {"tokens": [1]}}
    for path, body in bodies.items():
        refused = client.post(path, json=body)
        assert_openai_error(refused, 401)
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer not-the-key-0123456789"}
        assert_openai_error(client.post(path, json=body, headers=wrong), 401)
        keyed = client.post(path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert keyed.status_code == 200


def test_tokenize_is_not_offered_end_to_end(client: FlaskClient) -> None:
    """The tdllm-e2e/3 envelope names no endpoint: a second sealed endpoint would let the host
    send a sealed request to the other one (docs/api.md)."""
    for path in ("/v1/e2e/tokenize", "/v1/e2e/detokenize"):
        assert_openai_error(client.post(path, json={"enc": "", "ciphertext": ""}), 404)


def test_tokenize_logs_neither_text_nor_ids(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "zebra-quartz-lantern"
    ids = _tokenize(client, prompt=f"My code is {marker}")["tokens"]
    caplog.set_level(logging.DEBUG)
    for path, body in [
        ("/tokenize", {"prompt": f"My code is {marker}"}),
        ("/detokenize", {"tokens": ids}),
        ("/tokenize", {"messages": [{"role": "user", "content": marker}]}),
        ("/tokenize", {"prompt": marker, "bogus": marker}),
        ("/detokenize", {"tokens": [*ids, 10**12]}),
    ]:
        client.post(path, json=body).close()  # the access line is written on close
    access = [r for r in caplog.records if r.name == "tdllm.api.access"]
    assert [r.fields["status"] for r in access] == [200, 200, 200, 400, 400]  # type: ignore[attr-defined]
    assert access[0].fields["token_count"] == len(ids)  # type: ignore[attr-defined]
    spelled = (str(ids)[1:-1], ",".join(map(str, ids)), " ".join(map(str, ids)))
    for record in caplog.records:
        logged = record.getMessage() + str(getattr(record, "fields", ""))
        assert marker not in logged
        assert not any(s in logged for s in spelled)


def test_tokenize_is_refused_while_the_service_drains(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    app.extensions["tdllm"].drain.begin()
    client = app.test_client()
    for path, body in {"/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [1]}}.items():
        refused = client.post(path, json=body)
        assert assert_openai_error(refused, 503)["code"] == "shutting_down"
        assert refused.headers["Retry-After"] == "5"


# -- client mistakes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ({"model": 7, "prompt": "hi"}, 400, "model"),
        ({"model": ""}, 400, "model"),
        ({}, 400, "prompt"),
        ({"model": MODEL, "prompt": None}, 400, "prompt"),
        ({"model": MODEL, "prompt": ["a"]}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1, 2]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "messages": QUESTION}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ({"model": MODEL, "prompt": "hi", "return_token_strs": 1}, 400, "return_token_strs"),
        ({"model": MODEL, "prompt": "hi", "add_generation_prompt": True}, 400, None),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 4}, 400, "max_tokens"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": None}, 400, "messages"),
        ({"model": MODEL, "messages": "hi"}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "messages[0]"),
        ({"model": MODEL, "messages": QUESTION, "chat_template": "{{ 7*7 }}"}, 400, None),
        ({"model": MODEL, "messages": QUESTION, "chat_template_kwargs": {}}, 400, None),
        ({"model": MODEL, "messages": QUESTION, "add_generation_prompt": 1}, 400, None),
        ({"model": MODEL, "messages": QUESTION, "continue_final_message": True}, 400, None),
        (
            {"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]},
            400,
            "tools[0].function",
        ),
        ({"model": MODEL, "prompt": "word " * 400}, 400, "prompt"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, None),
        ({"model": MODEL, "prompt": "a\x00b"}, 400, "prompt"),
    ],
)
def test_tokenize_refuses_bad_input_with_a_4xx_in_the_error_shape(
    client: FlaskClient, body: dict[str, Any], status: int, param: str | None
) -> None:
    error = assert_openai_error(client.post("/tokenize", json=body), status, param)
    if param is None:  # the field the refusal names, checked apart where it is one of several
        assert error["param"] is not None


def test_a_prompt_too_long_to_generate_from_is_too_long_to_tokenize(
    make_app: Callable[..., Flask],
) -> None:
    """The completions' limits, by the same check: max_prompt_tokens, then the context."""
    client = make_app(max_prompt_tokens=8).test_client()
    over = {"model": MODEL, "prompt": "one two three four five six seven eight nine ten"}
    error = assert_openai_error(client.post("/tokenize", json=over), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert "the limit is 8" in error["message"]
    assert error == assert_openai_error(client.post("/v1/completions", json=over), 400, "prompt")
    chat = {"model": MODEL, "messages": QUESTION}
    error = assert_openai_error(client.post("/tokenize", json=chat), 400, "messages")
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "tokens",
    [[VOCAB], [1, 2, VOCAB + 1], [2**31], [2**40], [2**64], [10**19]],
)
def test_detokenize_refuses_ids_outside_the_vocabulary(
    client: FlaskClient, tokens: list[int]
) -> None:
    error = assert_openai_error(
        client.post("/detokenize", json={"model": MODEL, "tokens": tokens}), 400, "tokens"
    )
    assert error["message"] == f"token ids must be in [0, {VOCAB})"
    assert _detokenize(client, [VOCAB - 1])  # the last id is one


@pytest.mark.parametrize(
    ("tokens", "param"),
    [
        ([-1], "tokens"),
        ([1, -5], "tokens"),
        ([1.5], "tokens"),
        ([1.0], "tokens"),
        ([True], "tokens"),
        (["1"], "tokens"),
        ([[1]], "tokens"),
        ("1 2", "tokens"),
        (None, "tokens"),
        ([10**20], "tokens[0]"),  # more digits than any field takes: refused while parsing
    ],
)
def test_detokenize_refuses_what_is_not_a_list_of_ids(
    client: FlaskClient, tokens: Any, param: str
) -> None:
    body = {"model": MODEL, "tokens": tokens}
    assert_openai_error(client.post("/detokenize", json=body), 400, param)


def test_detokenize_refuses_more_ids_than_the_context_holds(client: FlaskClient) -> None:
    assert _detokenize(client, [30] * CONTEXT) == "." * CONTEXT
    body = {"model": MODEL, "tokens": [30] * (CONTEXT + 1)}
    error = assert_openai_error(client.post("/detokenize", json=body), 400, "tokens")
    assert f"at most {CONTEXT}" in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4", "tokens": [1]}, 404, "model"),
        ({"model": MODEL}, 400, "tokens"),
        ({"model": MODEL, "tokens": [1], "prompt": "hi"}, 400, "prompt"),
        ({"model": MODEL, "tokens": [1], "skip_special_tokens": True}, 400, None),
    ],
)
def test_detokenize_refuses_bad_bodies(
    client: FlaskClient, body: dict[str, Any], status: int, param: str | None
) -> None:
    assert_openai_error(client.post("/detokenize", json=body), status, param)


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'"hi"', b"{", b'{"prompt": "a", "prompt": "b"}', b"\xff\xfe{}"]
)
def test_malformed_bodies_are_400(client: FlaskClient, path: str, raw: bytes) -> None:
    resp = client.post(path, data=raw, content_type="application/json")
    assert_openai_error(resp, 400)


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_only_post_is_routed(client: FlaskClient, path: str) -> None:
    assert_openai_error(client.get(path), 405)
