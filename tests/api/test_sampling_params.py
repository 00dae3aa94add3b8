"""Sampling the way clients ask, on the bundled model (tdllm engine): n choices from one prefill,
presence/frequency/repetition penalties, logit_bias, min_tokens, list and token-id prompts,
max_completion_tokens, through Flask's test client and the official `openai` client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from flask import Flask
from flask.testing import FlaskClient
from openai import OpenAI

from tdllm.api.runner import EngineRunner, Overloaded
from tdllm.engine import SamplingParams
from tdllm.settings import Settings, SettingsError, load_settings

from .conftest import MODEL
from .sse_frames import parse_sse
from .test_request_validation import assert_openai_error

PARIS = "The capital of France is"
STORY = "Once upon a time"
LOOP = "List the numbers: one, two, three, one, two, three, one, two,"
EOS = 2  # <|im_end|>, one of the bundled tokenizer's stop tokens


def completion(client: FlaskClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/completions", json={"model": MODEL} | body)
    assert resp.status_code == 200, resp.get_json()
    doc: dict[str, Any] = resp.get_json()
    resp.close()
    return doc


def texts(doc: dict[str, Any]) -> list[str]:
    assert [c["index"] for c in doc["choices"]] == list(range(len(doc["choices"])))
    return [c["text"] for c in doc["choices"]]


def encode(runner: EngineRunner, text: str) -> list[int]:
    return runner.engine.tokenizer.encode(text)


@pytest.fixture
def prefills(runner: EngineRunner, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The token count of every multi-token forward pass of the session's engine (prefills)."""
    model = runner.engine.model
    forward = model.forward
    seen: list[int] = []

    def counting(tokens, batch, cache, last_only=True):  # type: ignore[no-untyped-def]
        if tokens.shape[1] > 1:
            seen.extend([tokens.shape[1]] * tokens.shape[0])
        return forward(tokens, batch, cache, last_only)

    monkeypatch.setattr(model, "forward", counting)
    yield seen


# -- n -----------------------------------------------------------------------------------------


def test_n_greedy_choices_are_identical_and_share_one_prefill(
    client: FlaskClient, runner: EngineRunner, prefills: list[int]
) -> None:
    doc = completion(client, prompt=PARIS, max_tokens=4, temperature=0, n=3)
    assert prefills == [len(encode(runner, PARIS))]  # one prompt row, prefilled once for three
    first, second, third = texts(doc)
    assert first == second == third and "Paris" in first
    assert [c["finish_reason"] for c in doc["choices"]] == ["length"] * 3
    # the prompt is counted once, every choice's tokens
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_n_sampled_choices_with_a_seed_reproduce_and_choice_i_uses_seed_plus_i(
    client: FlaskClient,
) -> None:
    body = {"prompt": STORY, "max_tokens": 6, "temperature": 1.0, "seed": 21, "n": 3}
    choices = texts(completion(client, **body))
    assert texts(completion(client, **body)) == choices
    assert len(set(choices)) > 1
    for i, text in enumerate(choices):
        alone = completion(client, **(body | {"n": 1, "seed": 21 + i}))
        assert texts(alone) == [text]


def test_list_and_token_id_prompts_give_choices_in_order_with_usage_per_prompt(
    client: FlaskClient, runner: EngineRunner
) -> None:
    greedy = {"max_tokens": 3, "temperature": 0}
    paris, story = (texts(completion(client, prompt=p, **greedy))[0] for p in (PARIS, STORY))
    doc = completion(client, prompt=[PARIS, STORY], n=2, **greedy)
    assert texts(doc) == [paris, paris, story, story]  # index = prompt_index * n + choice
    prompt_tokens = len(encode(runner, PARIS)) + len(encode(runner, STORY))
    assert doc["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }
    ids = [encode(runner, STORY), encode(runner, PARIS)]
    by_ids = completion(client, prompt=ids, **greedy)
    assert texts(by_ids) == [story, paris]
    assert by_ids["usage"]["prompt_tokens"] == prompt_tokens
    assert texts(completion(client, prompt=[STORY], **greedy)) == [story]  # a list of one


def test_a_stream_sends_each_choice_by_index_and_the_totals_last(client: FlaskClient) -> None:
    body = {"prompt": [PARIS, STORY], "n": 2, "max_tokens": 3, "temperature": 0}
    whole = texts(completion(client, **body))
    resp = client.post(
        "/v1/completions",
        json={"model": MODEL, "stream": True, "stream_options": {"include_usage": True}} | body,
    )
    events, done = parse_sse(resp.get_data(as_text=True))
    assert done
    streamed = [""] * 4
    finished = []
    for event in events[:-1]:
        (choice,) = event["choices"]  # one choice per chunk
        streamed[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finished.append(choice["index"])
    assert streamed == whole and sorted(finished) == [0, 1, 2, 3]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12


def test_chat_answers_n_choices_and_its_stream_opens_each(client: FlaskClient) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_completion_tokens": 4,
        "temperature": 0,
        "n": 2,
    }
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    assert [c["index"] for c in doc["choices"]] == [0, 1]
    assert doc["choices"][0]["message"] == doc["choices"][1]["message"]
    assert doc["usage"]["completion_tokens"] == 8
    resp = client.post("/v1/chat/completions", json=body | {"stream": True})
    events, done = parse_sse(resp.get_data(as_text=True))
    assert done
    openings = [e["choices"][0] for e in events[:2]]
    assert [(o["index"], o["delta"]) for o in openings] == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
    ]
    content = ["", ""]
    for event in events[2:]:
        (choice,) = event["choices"]
        content[choice["index"]] += choice["delta"].get("content", "")
    assert content == [c["message"]["content"] for c in doc["choices"]]


def test_an_abandoned_stream_cancels_every_choice(
    client: FlaskClient, runner: EngineRunner
) -> None:
    body = {"model": MODEL, "prompt": [PARIS, STORY], "n": 2, "max_tokens": 100, "stream": True}
    resp = client.post("/v1/completions", json=body, buffered=False)
    assert next(iter(resp.response)).startswith(b"data: ")  # decoding has begun
    assert runner.outstanding == 4
    resp.close()  # the client goes away: four sequences of two requests are cancelled
    deadline = time.monotonic() + 60
    while runner.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.outstanding == 0


def test_the_runner_counts_choices_against_its_capacity(runner: EngineRunner) -> None:
    params = SamplingParams(max_tokens=1, n=4)  # capacity: max_batch 4 + queue_size 4
    handles = runner.submit_all([[1, 2, 3]], params) + runner.submit_all([[4, 5]], params)
    with pytest.raises(Overloaded):
        runner.submit([1], SamplingParams(max_tokens=1))
    for handle in handles:
        assert [o.index for o in handle.outputs(60)] and handle.finished
    assert runner.outstanding == 0


# -- penalties, logit_bias, min_tokens -----------------------------------------------------------


def test_logit_bias_bans_the_greedy_token_and_forces_another(
    client: FlaskClient, runner: EngineRunner
) -> None:
    greedy = {"prompt": PARIS, "max_tokens": 1, "temperature": 0}
    first = texts(completion(client, **greedy))[0]
    (token,) = encode(runner, first)
    banned = texts(completion(client, **greedy, logit_bias={str(token): -100}))[0]
    assert banned != first
    forced_id = encode(runner, " banana")[0]
    forced = completion(client, **(greedy | {"max_tokens": 3}), logit_bias={str(forced_id): 100})
    assert texts(forced)[0] == runner.engine.tokenizer.decode([forced_id] * 3)


def test_min_tokens_keeps_eos_out_until_enough_tokens_are_out(client: FlaskClient) -> None:
    """A bias makes EOS the greedy token: it ends the completion at once, unless min_tokens."""
    body = {"prompt": PARIS, "max_tokens": 8, "temperature": 0, "logit_bias": {str(EOS): 100}}
    early = completion(client, **body)
    assert early["choices"][0]["finish_reason"] == "stop"
    assert early["usage"]["completion_tokens"] == 1
    held = completion(client, **body, min_tokens=5)
    assert held["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 6  # five tokens, then the EOS
    assert held["choices"][0]["text"]


def test_min_tokens_lets_a_stop_string_end_the_text_only_after_it(client: FlaskClient) -> None:
    free = texts(completion(client, prompt=LOOP, max_tokens=12, temperature=0))[0]
    assert free.startswith(" three, one")
    stopped = completion(client, prompt=LOOP, max_tokens=12, temperature=0, stop=[","])
    assert texts(stopped) == [" three"]
    later = completion(client, prompt=LOOP, max_tokens=12, temperature=0, stop=[","], min_tokens=3)
    assert texts(later)[0] == " three, one"  # the first comma is inside the first 3 tokens


def repeats(runner: EngineRunner, text: str) -> int:
    tokens = encode(runner, text)
    return len(tokens) - len(set(tokens))


def test_frequency_penalty_measurably_reduces_repetition(
    client: FlaskClient, runner: EngineRunner
) -> None:
    for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
        body = {"prompt": LOOP, "max_tokens": 32} | sampling
        plain = repeats(runner, texts(completion(client, **body))[0])
        penalized = repeats(runner, texts(completion(client, **body, frequency_penalty=1.0))[0])
        assert penalized < plain / 2, (sampling, plain, penalized)


def test_presence_and_repetition_penalties_change_the_greedy_text(client: FlaskClient) -> None:
    body = {"prompt": LOOP, "max_tokens": 12, "temperature": 0}
    plain = texts(completion(client, **body))[0]
    assert texts(completion(client, **body, presence_penalty=2))[0] != plain
    assert texts(completion(client, **body, repetition_penalty=1.8))[0] != plain
    assert texts(completion(client, **body, presence_penalty=0, repetition_penalty=1))[0] == plain


def test_max_completion_tokens_is_max_tokens(client: FlaskClient) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    for limits in ({"max_completion_tokens": 3}, {"max_tokens": 3, "max_completion_tokens": 3}):
        doc = client.post("/v1/chat/completions", json=chat | limits).get_json()
        assert doc["usage"]["completion_tokens"] == 3, doc
    big = client.post("/v1/chat/completions", json=chat | {"max_completion_tokens": 10**6})
    assert_openai_error(big, 400, "max_completion_tokens")


# -- refusals ------------------------------------------------------------------------------------

BASE = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (BASE | {"n": 3}, "n", "at most 2 (max_n)"),
        (BASE | {"n": 0}, "n", "positive integer"),
        (BASE | {"n": 1.0}, "n", "positive integer"),
        (BASE | {"prompt": ["a", "b", "c"]}, "prompt", "3 choices"),
        (BASE | {"prompt": [[1], [2]], "n": 2}, "prompt", "4 choices"),
        (BASE | {"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        (BASE | {"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        (BASE | {"frequency_penalty": "1"}, "frequency_penalty", "[-2, 2]"),
        (BASE | {"repetition_penalty": 0}, "repetition_penalty", "(0, 2]"),
        (BASE | {"repetition_penalty": 2.5}, "repetition_penalty", "(0, 2]"),
        (BASE | {"logit_bias": {"50": 101}}, "logit_bias", "[-100, 100]"),
        (BASE | {"logit_bias": {"hello": 1}}, "logit_bias", "token ids"),
        (BASE | {"logit_bias": {"-1": 1}}, "logit_bias", "token ids"),
        (BASE | {"logit_bias": {"50": True}}, "logit_bias", "numbers"),
        (BASE | {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        (BASE | {"logit_bias": {"49152": 1}}, "logit_bias", "outside the vocabulary"),
        (BASE | {"min_tokens": -1}, "min_tokens", ">= 0"),
        (BASE | {"min_tokens": 5}, "min_tokens", "at most max_tokens (4)"),
        ({"model": MODEL, "prompt": "hi", "min_tokens": 17}, "min_tokens", "max_tokens (16)"),
        (BASE | {"prompt": []}, "prompt", "non-empty"),
        (BASE | {"prompt": [[1, 2], [49152]]}, "prompt", "token ids must be in"),
    ],
)
def test_bad_sampling_values_are_400_naming_the_parameter(
    make_app: Callable[..., Flask], body: dict[str, Any], param: str, words: str
) -> None:
    client = make_app(max_n=2).test_client()
    error = assert_openai_error(client.post("/v1/completions", json=body), 400, param)
    assert words in error["message"]


def test_n_beyond_max_batch_or_the_queue_is_a_400_that_says_so(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(max_n=16).test_client()  # the session engine: max_batch 4, queue_size 4
    error = assert_openai_error(client.post("/v1/completions", json=BASE | {"n": 5}), 400, "n")
    assert "at most 4 sequences at once (max_batch)" in error["message"]
    many = BASE | {"prompt": ["a", "b", "c"], "n": 3}
    error = assert_openai_error(client.post("/v1/completions", json=many), 400, "prompt")
    assert "holds at most 8 (max_batch + queue_size)" in error["message"]


def test_max_n_is_a_setting_of_at_least_1() -> None:
    assert Settings().max_n == 8
    assert load_settings(environ={"TDLLM_MAX_N": "3"}).max_n == 3
    with pytest.raises(SettingsError, match="max_n must be at least 1"):
        Settings(max_n=0)


def test_chat_refuses_differing_max_tokens_and_max_completion_tokens(client: FlaskClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    resp = client.post("/v1/chat/completions", json=body | {"max_completion_tokens": 3})
    error = assert_openai_error(resp, 400, "max_completion_tokens")
    assert "differ" in error["message"]


# -- the official client -----------------------------------------------------------------------


def openai_client(app: Flask) -> OpenAI:
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app), base_url="http://td")
    return OpenAI(base_url="http://td/v1", api_key="unused", http_client=http, max_retries=0)


def test_the_openai_client_sends_these_parameters(
    make_app: Callable[..., Flask], runner: EngineRunner
) -> None:
    client = openai_client(make_app())
    eos_free = {str(EOS): -100}
    result = client.completions.create(
        model=MODEL,
        prompt=[PARIS, STORY],
        n=2,
        max_tokens=3,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias=eos_free,  # type: ignore[arg-type]
        seed=5,
        extra_body={"repetition_penalty": 1.2, "min_tokens": 2},
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text
    assert result.usage is not None and result.usage.completion_tokens == 12
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a color."}],
        n=3,
        max_completion_tokens=4,
        temperature=0.7,
        seed=9,
        logit_bias=eos_free,  # type: ignore[arg-type]
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a color."}],
        n=3,
        max_completion_tokens=4,
        temperature=0.7,
        seed=9,
        logit_bias=eos_free,  # type: ignore[arg-type]
        stream=True,
    )
    streamed = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in chat.choices]
    with pytest.raises(Exception, match="max_n") as refused:
        client.completions.create(model=MODEL, prompt="hi", n=9, max_tokens=1)
    assert getattr(refused.value, "status_code", None) == 400
