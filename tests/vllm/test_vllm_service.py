"""The bundled model served by vLLM behind our front, through the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tdllm.model.bundled import BUNDLED_NAME
from tdllm.vllm_engine.socket_http import UnixHTTPConnection
from tests.vllm.conftest import RunningService, wait_until

pytestmark = pytest.mark.vllm
MODEL = BUNDLED_NAME
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture
def sdk(plain_service: RunningService) -> Iterator[openai.OpenAI]:
    """The official client on the service, closed after the test (left open, its pooled
    keep-alive connection is a ResourceWarning in whichever test the garbage collector runs)."""
    with openai.OpenAI(base_url=plain_service.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_chat_answers_through_the_front_and_the_card_names_the_engine(
    sdk: openai.OpenAI,
    plain_service: RunningService,
) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None and answer.usage.completion_tokens >= 1
    card = sdk.models.list().data[0].to_dict()
    assert card["id"] == MODEL and card["max_model_len"] == 1024
    assert card["tdllm"] == {
        "profile": "td-only",
        "device": None,
        "k": None,
        "engine": "vllm",
        "logprobs": "top-k:2",
    }
    ready = requests.get(plain_service.url + "/ready", timeout=10).json()
    assert ready["ready"] is True


def test_streams_in_openai_shape_with_usage_last(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and not chunks[-1].choices
    completion = sdk.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in completion).strip()


def test_a_required_tool_call_comes_back_in_openai_shape(sdk: openai.OpenAI) -> None:
    """vLLM's tool calling, relayed: `required` makes the model call the tool and the answer
    carries `tool_calls` with JSON arguments. (Measured on this 135M model with vLLM 0.32: the
    arguments are JSON but do not always fit the tool's schema, so this checks the shape.)"""
    answer = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris, in Celsius?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.function.name == "get_weather" for c in calls)  # type: ignore[union-attr]
    for call in calls:
        json.loads(call.function.arguments)  # type: ignore[union-attr]


def test_json_schema_outputs_parse_and_fit_the_schema(sdk: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    for _ in range(5):  # sampled at temperature 1: the grammar, not luck, keeps it valid
        answer = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Invent a person; answer in JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema, "strict": True},
            },
            max_tokens=48,
            temperature=1.0,
        )
        person = json.loads(answer.choices[0].message.content or "")
        assert set(person) == {"name", "age"}
        assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_n_choices_and_logprobs_come_from_vllm(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, n=2, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in answer.choices] == [0, 1]
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content[0].top_logprobs) == 2


def test_tokenize_and_detokenize_are_vllms_own_and_count_as_chat_does(
    sdk: openai.OpenAI,
    plain_service: RunningService,
) -> None:
    """Forwarded to vLLM's /tokenize and /detokenize: its shapes, its chat template, and the
    count its chat completion reports; the front's checks first (docs/api.md)."""
    url = plain_service.url
    answer = requests.post(
        url + "/tokenize", json={"model": MODEL, "messages": QUESTION}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert set(tokens) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokens["max_model_len"] == 1024 and tokens["count"] == len(tokens["tokens"])
    chat = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, temperature=0)
    assert chat.usage is not None and chat.usage.prompt_tokens == tokens["count"]
    text = requests.post(url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=60)
    assert text.status_code == 200, text.text
    assert text.json()["prompt"].endswith("<|im_start|>assistant\n")
    plain = {"prompt": "Hello world", "return_token_strs": True}
    words = requests.post(url + "/tokenize", json=plain, timeout=60).json()
    assert words["token_strs"] == ["Hello", "Ġworld"]
    for path, body in [
        ("/tokenize", {"prompt": "hi", "chat_template": "{{ 7*7 }}"}),
        ("/detokenize", {"tokens": [2**40]}),
        ("/detokenize", {"tokens": [-1]}),
    ]:
        refused = requests.post(url + path, json=body, timeout=60)
        assert refused.status_code == 400, (body, refused.text)


def test_client_mistakes_are_one_clear_4xx_in_openai_shape(plain_service: RunningService) -> None:
    url = plain_service.url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    cases = [
        # refused by the front: fields that change the server's behaviour, limits, the model
        (base | {"chat_template": "{{ 7*7 }}"}, 400, "chat_template"),
        (base | {"max_tokens": 100_000}, 400, "max_tokens"),
        (base | {"n": 99}, 400, "n"),
        (base | {"logprobs": True, "top_logprobs": 3}, 400, "top_logprobs"),  # policy top-k:2
        (base | {"model": "other"}, 404, "model"),
        # refused by vLLM, answered by the front in the same shape
        (base | {"messages": "not a list"}, 400, "messages"),
        (base | {"temperature": "hot"}, 400, None),
    ]
    for body, status, param in cases:
        resp = requests.post(url, json=body, timeout=60)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] == param, (body, error)
    resp = requests.post(url, data=b'{"model": ', timeout=60)
    assert resp.status_code == 400  # not JSON: the front's own parser, before vLLM


def test_a_body_with_a_repeated_key_never_reaches_vllm(plain_service: RunningService) -> None:
    """Duplicate keys are where two JSON parsers disagree (first or last wins): the front
    refuses them, so vLLM cannot read another value than the one the limits were checked on."""
    for pair in (b'"n": 99, "n": 2', b'"n": 2, "n": 99'):
        head = b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], ' % MODEL.encode()
        raw = head + b'"max_tokens": 3, ' + pair + b"}"
        resp = requests.post(
            plain_service.url + "/v1/chat/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert resp.status_code == 400 and "duplicate key" in resp.json()["error"]["message"]


ABORT = 'finished_reason="abort"'


def _vllm_metric(running: RunningService, name: str, label: str = "") -> float:
    connection = UnixHTTPConnection(running.backend.process.socket_path, 10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


def test_a_client_that_leaves_mid_stream_cancels_its_request_in_vllm(
    plain_service: RunningService,
) -> None:
    generated_before = _vllm_metric(plain_service, "vllm:generation_tokens_total")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 256,
        "min_tokens": 256,  # it would run the whole 256 tokens unless cancelled
        "stream": True,
    }
    with requests.post(
        plain_service.url + "/v1/chat/completions", json=body, stream=True, timeout=60
    ) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
    # the client is gone: the front closes vLLM's socket, vLLM aborts the sequence
    wait_until(lambda: plain_service.backend.outstanding == 0, 30)
    wait_until(lambda: _vllm_metric(plain_service, "vllm:num_requests_running") == 0, 30)
    time.sleep(1.0)
    generated = _vllm_metric(plain_service, "vllm:generation_tokens_total") - generated_before
    assert 1 <= generated < 200, generated


def test_vllm_listens_on_no_network_address_only_on_its_private_socket(
    plain_service: RunningService,
) -> None:
    import psutil

    process = plain_service.backend.process
    assert Path(process.socket_path).parent.stat().st_mode & 0o777 == 0o700
    root = psutil.Process(process.process.pid)
    tree = {root.pid, *(child.pid for child in root.children(recursive=True))}
    exposed = [
        (c.pid, c.type.name, c.laddr)
        for c in psutil.net_connections(kind="inet")
        if c.pid in tree
        and (c.status == psutil.CONN_LISTEN or (c.type.name == "SOCK_DGRAM" and not c.raddr))
        and not str(c.laddr.ip).startswith(("127.", "::1"))
    ]
    assert not exposed, f"vLLM processes bound to a network address: {exposed}"


def test_vllm_dying_fails_ready_with_the_reason_and_asks_for_a_fresh_worker(
    plain_service: RunningService,
) -> None:
    """Last in this module: it kills the module's vLLM."""
    process = plain_service.backend.process.process
    os.killpg(process.pid, signal.SIGKILL)
    wait_until(lambda: bool(plain_service.restarts), 30)
    assert "exited" in plain_service.restarts[0]
    resp = requests.get(plain_service.url + "/ready", timeout=10)
    assert resp.status_code == 503 and "exited" in resp.json()["reason"]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    resp = requests.post(plain_service.url + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_ready"
    time.sleep(0.5)
    assert not Path(plain_service.backend.process.socket_path).parent.exists()  # run dir gone
