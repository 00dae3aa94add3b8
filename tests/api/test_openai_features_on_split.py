"""The OpenAI features on the `split` profile, through the official `openai` client (issue 16's
"on td-only and split"): the public prefix runs on a device (the `cpu` device kind, across the
crossing), the private tail, sampling and grammars in the TD. The private tail is the bundled
base's stand-in (`stand_in_checkpoint`: the base with its last K blocks and head perturbed), so
no fine-tune is trained here. The td-only runs are the rest of tests/api."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
import torch
from openai import BadRequestError, OpenAI

from tdllm.api.app import create_app
from tdllm.api.runner import EngineRunner
from tdllm.engine import Engine
from tdllm.profiles.options import ProtectionOptions
from tdllm.profiles.registry import build_model
from tdllm.sources import open_checkpoint
from tdllm_lab.protection.private_model import stand_in_checkpoint

from .conftest import CONTEXT, MODEL, api_settings
from .test_sampling_params import openai_client
from .test_structured_outputs import PERSON, json_schema
from .test_tools import ASK, WEATHER, WEATHER_PARAMETERS

K = 2


@pytest.fixture(scope="module")
def split() -> Iterator[tuple[OpenAI, Any]]:
    """The official client on a service whose engine runs the split profile; the served model,
    whose crossing counts what the device was sent."""
    checkpoint = stand_in_checkpoint(open_checkpoint("bundled"), K)
    options = ProtectionOptions(profile="split", device="cpu", k=K)
    served = build_model(checkpoint, torch.float32, options, 4, CONTEXT)
    engine = Engine(served.model, checkpoint.tokenizer, 4, CONTEXT, prefill_chunk=32)
    runner = EngineRunner(engine, model_name=MODEL, queue_size=4).start()
    app = create_app(api_settings(logprobs_policy="top-k:2"), engine_runner=runner)
    try:
        yield openai_client(app), served
    finally:
        runner.stop()
        served.close()


def _crossed(served: Any) -> int:
    return int(served.crossing.transcript.bytes_crossed())


def test_a_required_tool_call_on_split_validates_whole_and_streamed(
    split: tuple[OpenAI, Any],
) -> None:
    client, served = split
    before = _crossed(served)
    # one call (parallel calls off) and a seed: with parallel calls a temperature-1 draw
    # sometimes starts a second block that 48 tokens cut (finish_reason `length`, 1 in 40 seeds)
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "parallel_tool_calls": False,
        "seed": 8,
    }
    whole = client.chat.completions.create(**body, tool_choice="required", max_tokens=48)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)  # type: ignore[union-attr]
    assert jsonschema_rs.validator_for(WEATHER_PARAMETERS).is_valid(arguments), arguments
    streamed = client.chat.completions.create(
        **body, tool_choice="required", max_tokens=48, stream=True
    )
    calls = [d for c in streamed for d in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert calls and calls[0].function is not None and calls[0].function.arguments
    assert _crossed(served) > before  # the prefix ran on the device


def test_a_json_schema_answer_on_split_parses_and_validates(split: tuple[OpenAI, Any]) -> None:
    client, _served = split
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    result = client.chat.completions.create(
        model=MODEL,
        messages=ask,  # type: ignore[arg-type]
        response_format=json_schema(PERSON),  # type: ignore[arg-type]
        max_tokens=96,
        temperature=1.0,
        seed=3,
    )
    assert result.choices[0].finish_reason == "stop"
    assert jsonschema_rs.validator_for(PERSON).is_valid(
        json.loads(result.choices[0].message.content or "")
    )


def test_logprobs_and_n_on_split(split: tuple[OpenAI, Any]) -> None:
    client, _served = split
    result = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=4,
        n=2,
        temperature=1.0,
        seed=7,
        presence_penalty=0.5,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in result.choices] == [0, 1]
    for choice in result.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    with pytest.raises(BadRequestError, match="top_logprobs"):  # beyond the owner's policy
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            max_tokens=2,
            logprobs=True,
            top_logprobs=3,
        )
