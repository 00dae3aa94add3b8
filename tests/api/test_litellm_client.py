"""LiteLLM's OpenAI-compatible provider (`litellm.completion(model="openai/<served name>",
api_base=..., api_key=...)`, pinned in service/constraints.txt) against the service on a
loopback port (docs/api.md, "Clients tested"): a plain and a streamed answer, a forced tool call
and the conversation with its result sent back, and response_format from a Pydantic model.

LiteLLM fetches its model cost map from the internet when imported unless
LITELLM_LOCAL_MODEL_COST_MAP=True is set first, so it is set here before the import, and the
import and every test run under a guard that refuses any connection off this machine."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
from pydantic import BaseModel, Field

from tdllm.api.runner import EngineRunner

from .conftest import MODEL
from .live_http import API_KEY, loopback_only, served
from .test_tools import ASK, WEATHER, WEATHER_PARAMETERS

# LiteLLM's streaming wrapper reads `model_fields` and `model_computed_fields` off an instance,
# which pydantic 2.11+ deprecates; under the suite's warnings-as-errors that would end the
# stream (its quirk, not ours)
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Accessing the 'model_(computed_)?fields' attribute on the instance"
    ":pydantic.warnings.PydanticDeprecatedSince211"
)


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=99_999_999)


@pytest.fixture(scope="module")
def litellm() -> Any:
    """LiteLLM, imported here (~8 s: not at collection) with its cost map local, off the network."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before the import: no fetch
    with loopback_only() as refused:
        module = importlib.import_module("litellm")
    assert refused == []
    return module


@pytest.fixture(scope="module")
def base_url(runner: EngineRunner, litellm: Any) -> Iterator[str]:
    with loopback_only() as refused, served(runner, max_prompt_tokens=448) as url:
        yield url
    assert refused == []


def complete(litellm: Any, base_url: str, messages: list[dict[str, Any]], **options: Any) -> Any:
    settings: dict[str, Any] = {"max_tokens": 8, "temperature": 0} | options
    return litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=API_KEY,
        messages=messages,
        num_retries=0,
        timeout=120,
        **settings,
    )


def test_plain_and_streamed_chat_give_the_same_greedy_answer(litellm: Any, base_url: str) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    answer = complete(litellm, base_url, messages)
    assert isinstance(answer, litellm.ModelResponse)
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert answer.model == MODEL and answer.id.startswith("chatcmpl-")
    assert 0 < answer.usage.completion_tokens <= 8

    chunks = list(
        complete(litellm, base_url, messages, stream=True, stream_options={"include_usage": True})
    )
    assert len(chunks) > 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the stream is the same text, in pieces
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [r for r in finish_reasons if r] == [choice.finish_reason]
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens == answer.usage.completion_tokens


def test_forced_tool_call_and_the_result_sent_back(litellm: Any, base_url: str) -> None:
    forced = {"type": "function", "function": {"name": "get_weather"}}
    called = complete(litellm, base_url, ASK, tools=[WEATHER], tool_choice=forced, max_tokens=48)
    [choice] = called.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(WEATHER_PARAMETERS).is_valid(arguments), arguments

    # LiteLLM's Message carries its own `provider_specific_fields`, sent back as a message field
    # when the Message is resent as is: refused, like any field OpenAI does not document
    # (docs/api.md, "Clients tested"); an agent sends the OpenAI fields
    as_is = choice.message.model_dump(exclude_none=True)
    assert "provider_specific_fields" in as_is
    tool_result = {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}
    with pytest.raises(litellm.BadRequestError, match=r"messages\[1\]"):
        complete(litellm, base_url, [*ASK, as_is, tool_result], tools=[WEATHER])

    sent_back = choice.message.model_dump(exclude_none=True, exclude={"provider_specific_fields"})
    answer = complete(litellm, base_url, [*ASK, sent_back, tool_result], tools=[WEATHER])
    [final] = answer.choices
    assert final.message.content or final.message.tool_calls
    assert answer.usage.prompt_tokens > called.usage.prompt_tokens


def test_response_format_from_a_pydantic_model(litellm: Any, base_url: str) -> None:
    # LiteLLM turns the class into response_format {"type": "json_schema", ...}
    messages = [{"role": "user", "content": "Name a city in France."}]
    answer = complete(litellm, base_url, messages, response_format=City, max_tokens=64)
    [choice] = answer.choices
    assert choice.finish_reason == "stop"
    city = City.model_validate_json(choice.message.content)
    assert 0 < len(city.name) <= 12
