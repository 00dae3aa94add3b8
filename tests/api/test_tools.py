"""Tool calls on our engine: tools, tool_choice and parallel_tool_calls (docs/api.md, "Tool calls
on the tdllm engine"). The parser and the prompt format on strings; the refusals through Flask's
test client; calls through the official `openai` client on the bundled model, where `required`
and named choices are decoded under llguidance's grammar, so their arguments always validate
(20 temperature-1 samples in the slow test, a few in the fast ones)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask
from flask.testing import FlaskClient
from openai import OpenAI
from openai.types.chat import ChatCompletion

from tdllm.api.openai.chat_messages import parse_messages
from tdllm.api.openai.tool_calls import CallStream, split_calls
from tdllm.api.openai.tool_prompt import with_tools
from tdllm.api.openai.tools import MAX_PARALLEL_CALLS, MAX_TOOLS, ToolUse, tool_use

from .conftest import MODEL
from .test_request_validation import assert_openai_error
from .test_sampling_params import openai_client

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["hours"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": TIME_PARAMETERS},
}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "set_alarm": TIME_PARAMETERS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ID = "call_abc123"
HISTORY: list[dict[str, Any]] = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Paris", "unit": "celsius"}',
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": "18 degrees and sunny"},
]


def use_of(**body: Any) -> ToolUse:
    use = tool_use({"tools": [WEATHER, CLOCK]} | body)
    assert use is not None
    return use


def block(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(max_prompt_tokens=448)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def sdk(app: Flask) -> OpenAI:
    return openai_client(app)


def assert_valid_call(call: Any, names: set[str]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(SCHEMAS[call.function.name]).is_valid(arguments), arguments


# -- the parser and the prompt format, on strings ---------------------------------------------


def test_parses_a_valid_block_into_a_call_and_leaves_the_rest_as_content() -> None:
    text = "Let me check.\n" + block("get_weather", {"city": "Paris", "unit": "celsius"})
    answer = split_calls(text, use_of())
    assert answer.content == "Let me check."
    [call] = answer.calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Paris","unit":"celsius"}',
    }
    assert answer.finish_reason("stop") == "tool_calls"
    assert answer.finish_reason("length") == "length"


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        block("get_time", {"city": "Paris"}),  # not an offered tool
        block("get_weather", {"city": "Paris"}),  # misses unit
        block("get_weather", {"city": "Paris", "unit": "kelvin"}),
        "<tool_call>\n"
        + json.dumps({"name": "set_alarm", "args": {"hours": 1}})
        + "\n</tool_call>",
        "<tool_call>\n" + json.dumps({"name": "set_alarm", "arguments": {"hours": 1}}),  # open
        '<tool_call>{"name":"set_alarm","arguments":{"hours":NaN}}</tool_call>',
        '<tool_call>{"name":"set_alarm","arguments":' + "[" * 5000 + "</tool_call>",
    ],
)
def test_keeps_a_block_that_does_not_parse_or_validate_as_content(bad: str) -> None:
    text = f"Sure. {bad}"
    answer = split_calls(text, use_of())
    assert answer.calls == () and answer.content == text
    assert answer.finish_reason("stop") == "stop"


def test_parses_every_block_and_a_list_in_one_block() -> None:
    two = [{"name": "set_alarm", "arguments": {"hours": 7}}] * 2
    text = block("get_weather", {"city": "Oslo", "unit": "celsius"}) + "\n"
    text += f"<tool_call>{json.dumps(two)}</tool_call>"
    answer = split_calls(text, use_of())
    assert [c["function"]["name"] for c in answer.calls] == [
        "get_weather",
        "set_alarm",
        "set_alarm",
    ]
    assert answer.content is None
    assert len({c["id"] for c in answer.calls}) == 3


def test_keeps_only_the_first_call_without_parallel_tool_calls() -> None:
    text = block("set_alarm", {"hours": 6}) + block("set_alarm", {"hours": 7})
    answer = split_calls(text, use_of(parallel_tool_calls=False))
    assert [json.loads(c["function"]["arguments"]) for c in answer.calls] == [{"hours": 6}]


def test_a_stream_holds_back_only_what_may_begin_a_call() -> None:
    stream = CallStream(use_of())
    sent = [stream.feed(piece) for piece in ["Hello <", "b> and <tool", "_call>\n", '{"name"']]
    assert sent == ["Hello ", "<b> and ", "", ""]
    stream.feed(':"set_alarm","arguments":{"hours":5}}\n</tool_call>')
    answer = stream.finish()
    assert answer.content is None and len(answer.calls) == 1
    plain = CallStream(use_of())
    assert plain.feed("no calls <too") == "no calls "
    assert plain.finish().content == "<too"


def test_the_tools_are_listed_in_the_system_message() -> None:
    alone = with_tools(ASK, [WEATHER])
    assert [m["role"] for m in alone] == ["system", "user"]
    assert '"name":"get_weather"' in alone[0]["content"] and "<tool_call>" in alone[0]["content"]
    merged = with_tools([{"role": "system", "content": "Be brief."}, *ASK], [WEATHER])
    assert [m["role"] for m in merged] == ["system", "user"]
    assert merged[0]["content"].startswith("Be brief.\n\n# Tools")


def test_calls_and_results_in_the_history_are_written_in_the_tool_format() -> None:
    turns = parse_messages(HISTORY)
    assert turns[1] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris",'
        '"unit":"celsius"}}\n</tool_call>',
    }
    assert turns[2] == {
        "role": "user",
        "content": '<tool_response>\n{"name":"get_weather","content":"18 degrees and sunny"}\n'
        "</tool_response>",
    }


def test_arguments_in_the_history_that_are_not_json_are_written_as_sent() -> None:
    deep = "[" * 5000 + "]" * 5000  # JSON, but past the request body's depth limit
    for arguments in ("not json", deep):
        call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        [_, turn] = parse_messages([*ASK, {"role": "assistant", "tool_calls": [call]}])
        assert json.loads(turn["content"].split("\n")[1])["arguments"] == arguments


# -- refusals: one 400 in OpenAI's shape, naming the parameter ----------------------------------


def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [_tool("has space")]}, "tools[0].function.name"),
        ({"tools": [_tool("f", {"type": "wat"})]}, "tools[0].function.parameters"),
        ({"tools": [_tool("f", {"$ref": "#/nope"})]}, "tools[0].function.parameters"),
        ({"tools": [_tool("f", [])]}, "tools[0].function.parameters"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
            "tools[0].function.x",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [_tool(f"f{i}") for i in range(MAX_TOOLS + 1)]}, "tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"messages": [{"role": "tool", "content": "18 degrees"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0]"),
        (
            {"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1"}]}]},
            "messages[1].tool_calls[0]",
        ),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0]"),
    ],
)
def test_refuses_a_bad_tool_request_with_one_400_naming_the_parameter(
    client: FlaskClient, body: dict[str, Any], param: str
) -> None:
    request = {"model": MODEL, "messages": ASK, "max_tokens": 1} | body
    assert_openai_error(client.post("/v1/chat/completions", json=request), 400, param)


def test_tool_choice_none_offers_no_tools(client: FlaskClient) -> None:
    """The prompt is the one without tools (same prompt_tokens): none neither offers nor parses."""
    plain = {"model": MODEL, "messages": ASK, "max_tokens": 1}
    without = client.post("/v1/chat/completions", json=plain).get_json()
    none = client.post(
        "/v1/chat/completions", json=plain | {"tools": [WEATHER], "tool_choice": "none"}
    ).get_json()
    offered = client.post("/v1/chat/completions", json=plain | {"tools": [WEATHER]}).get_json()
    assert none["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    assert offered["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 100
    assert "tool_calls" not in none["choices"][0]["message"]


def test_a_tool_result_round_trip_is_rendered_and_answered(
    client: FlaskClient, sdk: OpenAI
) -> None:
    """The history with a call and its result: /tokenize counts exactly what chat prefills,
    with the tools and without."""
    result = sdk.chat.completions.create(
        model=MODEL,
        messages=HISTORY,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=8,
        temperature=0,
    )
    assert result.choices[0].finish_reason in ("stop", "length", "tool_calls")
    conversation = {"model": MODEL, "messages": HISTORY}
    counted = client.post("/tokenize", json=conversation | {"tools": [WEATHER]}).get_json()
    assert result.usage is not None and result.usage.prompt_tokens == counted["count"]
    none = sdk.chat.completions.create(
        model=MODEL,
        messages=HISTORY,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=1,
    )
    bare = client.post("/tokenize", json=conversation).get_json()
    assert none.usage is not None and none.usage.prompt_tokens == bare["count"]
    assert bare["count"] + 100 < counted["count"]  # the tools section


# -- constrained calls through the official client ------------------------------------------


def required_call(sdk: OpenAI, n: int, seed: int) -> ChatCompletion:
    """`n` temperature-1 answers that must call one of the two tools."""
    return sdk.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1,
        max_tokens=64,
        n=n,
        seed=seed,
    )


def test_required_answers_with_a_call_whose_arguments_validate(sdk: OpenAI) -> None:
    result = required_call(sdk, n=2, seed=3)
    for choice in result.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert_valid_call(call, {"get_weather", "set_alarm"})


def test_a_named_function_is_one_call_streamed_as_openai_deltas(sdk: OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "set_alarm"}},  # one call, always
        temperature=1,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    finish = deltas[-1]
    assert finish.finish_reason == "tool_calls"
    [call] = finish.delta.tool_calls or []
    assert call.index == 0 and call.function is not None
    assert call.function.name == "set_alarm" and call.type == "function"
    assert json.loads(call.function.arguments or "")["hours"] in range(24)
    assert not any(d.delta.content for d in deltas)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_parallel_calls_are_each_valid_and_at_most_the_cap(sdk: OpenAI) -> None:
    result = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris and Rome, and an alarm at 7."}],
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice="required",
        temperature=1,
        max_tokens=128,
        seed=11,
    )
    choice = result.choices[0]
    calls = choice.message.tool_calls or []
    assert 1 <= len(calls) <= MAX_PARALLEL_CALLS
    for call in calls:
        assert_valid_call(call, {"get_weather", "set_alarm"})
    assert len({c.id for c in calls}) == len(calls)
    # a cut last block is the content; complete ones are calls either way
    assert choice.finish_reason in ("tool_calls", "length")


def test_auto_answers_with_content_or_valid_calls(sdk: OpenAI) -> None:
    """Whether the 135M model calls is its choice; what it answers is one shape or the other."""
    result = sdk.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_tokens=24,
    )
    choice = result.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert_valid_call(call, {"get_weather"})
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in (
            "stop",
            "length",
        )


@pytest.mark.slow
def test_twenty_required_samples_at_temperature_1_all_validate(sdk: OpenAI) -> None:
    calls = []
    for seed in range(5):
        result = required_call(sdk, n=4, seed=100 + seed)
        for choice in result.choices:
            assert choice.finish_reason == "tool_calls", choice
            calls += choice.message.tool_calls or []
    assert len(calls) == 20
    for call in calls:
        assert_valid_call(call, {"get_weather", "set_alarm"})
