"""LangChain's `ChatOpenAI` (langchain-openai, pinned in service/constraints.txt) against the
service on a loopback port (docs/api.md, "Clients tested"): a plain and a streamed answer,
`with_structured_output` both ways (response_format json_schema and a forced function call), and
the agent loop: `bind_tools` with a forced tool_choice, the tool run on the model's call, and the
`ToolMessage` sent back. One app per module on the session's engine; greedy, small max_tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import jsonschema_rs
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tdllm.api.runner import EngineRunner

from .conftest import MODEL
from .live_http import API_KEY, loopback_only, served


class City(BaseModel):
    """A city and how many people live there."""

    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=99_999_999)  # bounded: the 135M model would write digits


class WeatherQuery(BaseModel):
    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


@tool(args_schema=WeatherQuery)
def get_weather(city: str, unit: str) -> str:
    """The current weather in a city."""
    return f"18 degrees {unit} and sunny in {city}"


@pytest.fixture(scope="module")
def base_url(runner: EngineRunner) -> Iterator[str]:
    with loopback_only() as refused, served(runner, max_prompt_tokens=448) as url:
        yield url
    assert refused == []


def chat(base_url: str, **options: Any) -> ChatOpenAI:
    settings: dict[str, Any] = {"max_tokens": 8, "temperature": 0} | options
    return ChatOpenAI(
        base_url=base_url, api_key=API_KEY, model=MODEL, max_retries=0, timeout=120, **settings
    )


def test_invoke_and_stream_give_the_same_greedy_answer(base_url: str) -> None:
    llm = chat(base_url, stream_usage=True)
    answer = llm.invoke("Name a color.")
    assert isinstance(answer, AIMessage) and answer.content
    assert answer.response_metadata["model_name"] == MODEL
    assert answer.usage_metadata is not None and 0 < answer.usage_metadata["output_tokens"] <= 8

    chunks = list(llm.stream("Name a color."))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.content == answer.content  # greedy: the stream is the same text, in pieces
    assert whole.usage_metadata == answer.usage_metadata  # stream_options.include_usage
    assert whole.response_metadata["finish_reason"] == answer.response_metadata["finish_reason"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_a_validated_object(base_url: str, method: str) -> None:
    # json_schema: response_format {"type": "json_schema"} through the SDK's parse helper;
    # function_calling: one tool named City, forced with tool_choice, its arguments parsed
    llm = chat(base_url, max_tokens=64).with_structured_output(
        City, method=method, include_raw=True
    )
    result = llm.invoke("Name a city in France.")
    assert result["parsing_error"] is None, result["raw"]
    city = result["parsed"]
    assert isinstance(city, City), result["raw"]
    assert 0 < len(city.name) <= 12 and 0 <= city.population <= 99_999_999
    raw = result["raw"]
    if method == "function_calling":
        assert [call["name"] for call in raw.tool_calls] == ["City"]
        assert raw.response_metadata["finish_reason"] == "tool_calls"
    else:
        assert raw.response_metadata["finish_reason"] == "stop"


def test_bind_tools_round_trip(base_url: str) -> None:
    llm = chat(base_url, max_tokens=48)
    question = HumanMessage("What is the weather in Paris?")
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    called = forced.invoke([question])
    assert isinstance(called, AIMessage)
    assert called.response_metadata["finish_reason"] == "tool_calls"
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and call["id"] and call["id"].startswith("call_")
    schema = WeatherQuery.model_json_schema()
    assert jsonschema_rs.validator_for(schema).is_valid(call["args"]), call["args"]

    result = get_weather.invoke(call)  # a ToolCall in, a ToolMessage (with its id) out
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    # the same conversation back, tools offered (auto), as an agent loop sends it
    answer = chat(base_url).bind_tools([get_weather]).invoke([question, called, result])
    assert isinstance(answer, AIMessage)
    assert answer.content or answer.tool_calls
    assert answer.response_metadata["finish_reason"] in {"stop", "length", "tool_calls"}
    assert answer.usage_metadata is not None and called.usage_metadata is not None
    assert answer.usage_metadata["input_tokens"] > called.usage_metadata["input_tokens"]
