"""`response_format` on /v1/completions (vLLM's extension of the legacy endpoint), through the
official `openai` client's `extra_body`: the same field and grammar path as chat's
(tests/api/test_structured_outputs.py), so every choice of every prompt decodes to JSON that
fits, whole and streamed, and a malformed one is the same 400 naming it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import openai
import pytest
from flask import Flask
from openai import OpenAI

from tdllm.api.app import create_app
from tdllm.api.runner import EngineRunner

from .conftest import MODEL, api_settings
from .test_e2e_openai_features import PERSON
from .test_sampling_params import openai_client

PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
PROMPT = "A person, as JSON:"


@pytest.fixture(scope="module")
def sdk(runner: EngineRunner) -> OpenAI:
    return openai_client(create_app(api_settings(), engine_runner=runner))


def _fits(text: str, schema: dict[str, Any]) -> bool:
    return bool(jsonschema_rs.validator_for(schema).is_valid(json.loads(text)))


def test_a_json_schema_completion_of_each_prompt_fits_the_schema(sdk: OpenAI) -> None:
    result = sdk.completions.create(
        model=MODEL,
        prompt=[PROMPT, "Someone's record in JSON:"],
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": PERSON_FORMAT},
    )
    assert [c.index for c in result.choices] == [0, 1]
    for choice in result.choices:
        assert choice.finish_reason == "stop", choice
        assert _fits(choice.text, PERSON), choice.text


def test_streamed_json_object_deltas_concatenate_to_a_json_object(sdk: OpenAI) -> None:
    stream = sdk.completions.create(
        model=MODEL,
        prompt="The capital of France as a JSON object:",  # greedy: a 20-token object
        max_tokens=40,
        temperature=0,
        stream=True,
        extra_body={"response_format": {"type": "json_object"}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


def test_streamed_json_schema_deltas_equal_the_whole_answer(sdk: OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    extra = {"response_format": PERSON_FORMAT}
    whole = sdk.completions.create(**body, extra_body=extra).choices[0].text
    stream = sdk.completions.create(**body, stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole
    assert _fits(whole, PERSON)


def test_text_response_format_is_plain_generation(sdk: OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    plain = sdk.completions.create(**body).choices[0].text
    text = sdk.completions.create(**body, extra_body={"response_format": {"type": "text"}})
    assert text.choices[0].text == plain


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "yaml"}, "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nope"}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_a_malformed_response_format_is_the_400_chat_gives(
    make_app: Callable[..., Flask], response_format: Any, param: str
) -> None:
    client = make_app().test_client()
    base = {"model": MODEL, "max_tokens": 1, "response_format": response_format}
    completion = client.post("/v1/completions", json=base | {"prompt": "hi"})
    chat_body = base | {"messages": [{"role": "user", "content": "hi"}]}
    chat = client.post("/v1/chat/completions", json=chat_body)
    assert completion.status_code == chat.status_code == 400
    assert completion.get_json() == chat.get_json()
    assert completion.get_json()["error"]["param"] == param


def test_the_openai_client_raises_the_400_naming_response_format(sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.completions.create(
            model=MODEL, prompt="hi", max_tokens=1, extra_body={"response_format": "json"}
        )
    assert raised.value.status_code == 400
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == "response_format"
