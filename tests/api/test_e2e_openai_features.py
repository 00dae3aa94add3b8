"""The OpenAI features of chat through the end-to-end encrypted mode (tdllm-e2e/3): tools,
structured outputs, logprobs under the owner's policy and n choices go in sealed, unchanged, and
come back sealed and signed, whole and streamed; the TD's refusals come back sealed too, in
OpenAI's error shape. Lives beside tests/api/test_e2e.py to share its harness and the session's
engine (a second engine in another folder would load the model twice)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.client import E2eClient, E2eError, E2eServiceError, anchor_for
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import api_settings
from tests.api.e2e_transport import Events, RecordingTransport
from tests.api.test_tools import CLOCK, SCHEMAS
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
TOP_K = 3  # the owner's logprobs_policy here: top-k:3
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_ALARM = [{"role": "user", "content": "Wake me at 7."}]
ASK_PERSON = [{"role": "user", "content": "Invent a person and answer in JSON."}]
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
GREEDY = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture(scope="module")
def app(runner: EngineRunner, platform: SimulatedTdxPlatform) -> Flask:
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
    )
    # a record per chunk, so a tamper case can address the record that carries the calls
    settings = api_settings(
        attestation="simulated",
        allow_simulated=True,
        e2e_record_interval_ms=0,
        logprobs_policy=f"top-k:{TOP_K}",
        max_prompt_tokens=448,  # two tools take about 250 tokens of system prompt
    )
    return create_app(settings, engine_runner=runner, boot_deps=deps)


@pytest.fixture
def transport(app: Flask) -> RecordingTransport:
    return RecordingTransport(app.test_client())


@pytest.fixture
def e2e(transport: RecordingTransport, platform: SimulatedTdxPlatform) -> E2eClient:
    anchor = anchor_for(platform.root_der, {"TDLLM_ALLOW_SIMULATED_TDX": "1"})
    client = E2eClient(transport, anchor, policy=policy_for(platform))
    client.attest()
    return client


def _wire(transport: RecordingTransport) -> bytes:
    return b"".join(transport.wire)


def _valid_call(call: dict[str, Any], names: set[str]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] in names
    arguments = json.loads(call["function"]["arguments"])
    schema = SCHEMAS[call["function"]["name"]]
    assert jsonschema_rs.validator_for(schema).is_valid(arguments), arguments


def _by_choice(chunks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


def _text(choices: list[dict[str, Any]]) -> str:
    return "".join(c["delta"].get("content") or "" for c in choices)


# -- tools ----------------------------------------------------------------------------------


def test_a_required_tool_call_comes_back_sealed_with_arguments_that_validate(
    e2e: E2eClient, transport: RecordingTransport
) -> None:
    answer = e2e.chat(
        ASK_ALARM,
        tools=[CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=32,
    )
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    _valid_call(call, {"set_alarm"})
    # neither the tools offered nor the call made crossed the host in clear
    for marker in (b"set_alarm", b"hours", b"tool_calls", b"arguments", b"alarm"):
        assert marker not in _wire(transport)


def test_a_named_tool_call_streams_as_openai_deltas_through_sealed_records(
    e2e: E2eClient, transport: RecordingTransport
) -> None:
    chunks = list(
        e2e.chat_stream(
            ASK_ALARM,
            tools=[CLOCK],
            tool_choice={"type": "function", "function": {"name": "set_alarm"}},
            temperature=0,
            max_tokens=32,
            stream_options={"include_usage": True},
        )
    )
    deltas = _by_choice(chunks)[0]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert deltas[-1]["finish_reason"] == "tool_calls"
    (call,) = deltas[-1]["delta"]["tool_calls"]
    assert call["index"] == 0
    _valid_call(call, {"set_alarm"})
    assert not _text(deltas)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert b"set_alarm" not in _wire(transport) and b"tool_calls" not in _wire(transport)


def _drop_the_record_with_the_calls(events: Events) -> Events:
    """The host strips the last record before the end: the one whose chunk carries the calls
    (then the usage chunk's, then the final record)."""
    return [*events[:-3], *events[-2:]]


def test_a_host_that_strips_the_record_carrying_the_tool_calls_is_detected(
    e2e: E2eClient, transport: RecordingTransport
) -> None:
    transport.tamper_records = _drop_the_record_with_the_calls
    with pytest.raises(E2eError, match="does not decrypt"):
        list(
            e2e.chat_stream(
                ASK_ALARM,
                tools=[CLOCK],
                tool_choice={"type": "function", "function": {"name": "set_alarm"}},
                temperature=0,
                max_tokens=32,
                stream_options={"include_usage": True},
            )
        )


# -- structured outputs ----------------------------------------------------------------------


def test_a_json_schema_answer_parses_and_validates(e2e: E2eClient) -> None:
    answer = e2e.chat(ASK_PERSON, response_format=PERSON_FORMAT, temperature=0, max_tokens=40)
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "stop", choice
    assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(choice["message"]["content"]))


def test_streamed_json_schema_deltas_concatenate_to_json_that_validates(e2e: E2eClient) -> None:
    chunks = list(
        e2e.chat_stream(ASK_PERSON, response_format=PERSON_FORMAT, temperature=0, max_tokens=40)
    )
    deltas = _by_choice(chunks)[0]
    assert deltas[-1]["finish_reason"] == "stop"
    assert jsonschema_rs.validator_for(PERSON).is_valid(json.loads(_text(deltas)))


# -- logprobs, by the owner's policy ---------------------------------------------------------


def test_logprobs_within_the_policy_come_back_for_every_token(e2e: E2eClient) -> None:
    answer = e2e.chat(ASK_WEATHER, logprobs=True, top_logprobs=TOP_K, **GREEDY)
    (choice,) = answer["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 4
    assert "".join(item["token"] for item in content) == choice["message"]["content"]
    assert all(len(item["top_logprobs"]) == TOP_K for item in content)
    assert all(item["token"] == item["top_logprobs"][0]["token"] for item in content)  # greedy


def test_streamed_logprobs_arrive_once_per_token_in_order(e2e: E2eClient) -> None:
    whole = e2e.chat(ASK_WEATHER, logprobs=True, top_logprobs=1, **GREEDY)
    chunks = list(e2e.chat_stream(ASK_WEATHER, logprobs=True, top_logprobs=1, **GREEDY))
    streamed = [
        item for c in _by_choice(chunks)[0] if c["logprobs"] for item in c["logprobs"]["content"]
    ]
    assert [i["token"] for i in streamed] == [
        i["token"] for i in whole["choices"][0]["logprobs"]["content"]
    ]
    assert len(streamed) == 4


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_beyond_the_policy_are_a_sealed_400_in_openai_error_shape(
    e2e: E2eClient, transport: RecordingTransport, stream: bool
) -> None:
    options = {"logprobs": True, "top_logprobs": TOP_K + 1, **GREEDY}
    with pytest.raises(E2eServiceError) as raised:
        if stream:
            list(e2e.chat_stream(ASK_WEATHER, **options))
        else:
            e2e.chat(ASK_WEATHER, **options)
    assert raised.value.status == 400
    error = raised.value.error
    assert error is not None and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "top_logprobs" and error["type"] == "invalid_request_error"
    # the refusal itself travelled sealed: the host sees neither the field nor the message
    assert b"top_logprobs" not in _wire(transport) and b"invalid_request" not in _wire(transport)


# -- n choices -------------------------------------------------------------------------------


def test_n_2_returns_two_choices(e2e: E2eClient) -> None:
    answer = e2e.chat(ASK_WEATHER, n=2, seed=7, temperature=1, max_tokens=4)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["content"] and c["finish_reason"] for c in choices)
    assert answer["usage"]["completion_tokens"] <= 8


def test_a_streamed_n_2_answer_carries_both_choices_to_their_end(e2e: E2eClient) -> None:
    chunks: Iterator[dict[str, Any]] = e2e.chat_stream(
        ASK_WEATHER, n=2, seed=7, temperature=1, max_tokens=4
    )
    by_choice = _by_choice(list(chunks))
    assert sorted(by_choice) == [0, 1]
    for deltas in by_choice.values():
        assert _text(deltas) and deltas[-1]["finish_reason"] in ("stop", "length")
