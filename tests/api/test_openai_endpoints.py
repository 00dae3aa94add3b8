"""The OpenAI-shaped endpoints through Flask's test client, on the bundled model."""

from __future__ import annotations

from flask.testing import FlaskClient

from .conftest import CONTEXT, MODEL
from .sse_frames import parse_sse


def completion(client: FlaskClient, **body: object) -> dict[str, object]:
    resp = client.post("/v1/completions", json={"model": MODEL} | body)
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    resp.close()  # a WSGI server closes every response; that is when a request is counted
    assert isinstance(doc, dict)
    return doc


def test_models_lists_the_one_served_model(client: FlaskClient) -> None:
    doc = client.get("/v1/models").get_json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").get_json()["id"] == MODEL


def test_completion_returns_text_and_usage(client: FlaskClient) -> None:
    doc = completion(client, prompt="The capital of France is", max_tokens=5, temperature=0)
    choice = doc["choices"][0]  # type: ignore[index]
    assert doc["object"] == "text_completion" and str(doc["id"]).startswith("cmpl-")
    assert "Paris" in choice["text"]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_greedy_completion_is_deterministic(client: FlaskClient) -> None:
    first = completion(client, prompt="Once upon a time", max_tokens=8, temperature=0)
    second = completion(client, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert first["choices"] == second["choices"]


def test_seed_makes_sampling_reproducible(client: FlaskClient) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    assert completion(client, **body)["choices"] == completion(client, **body)["choices"]


def test_stop_sequence_ends_the_completion_before_it(client: FlaskClient) -> None:
    free = completion(client, prompt="The capital of France is", max_tokens=6, temperature=0)
    text = free["choices"][0]["text"]  # type: ignore[index]
    assert "Paris" in text
    stopped = completion(
        client, prompt="The capital of France is", max_tokens=6, temperature=0, stop=["Paris"]
    )
    choice = stopped["choices"][0]  # type: ignore[index]
    assert choice["finish_reason"] == "stop"
    assert "Paris" not in choice["text"] and text.startswith(choice["text"])


def test_token_id_prompt_is_accepted(client: FlaskClient) -> None:
    doc = completion(client, prompt=[504, 3575, 282, 4649, 314], max_tokens=2, temperature=0)
    assert doc["usage"]["prompt_tokens"] == 5  # type: ignore[index]


def test_chat_uses_the_chat_template_and_answers(client: FlaskClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            "max_tokens": 12,
            "temperature": 0,
            "user": "someone",  # documented OpenAI field: accepted
        },
    )
    doc = resp.get_json()
    assert resp.status_code == 200, doc
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in doc["choices"][0]["message"]["content"]
    # the template wraps the messages: many more prompt tokens than the raw text
    assert doc["usage"]["prompt_tokens"] > 20


def test_streaming_chat_frames_chunks_usage_and_done(client: FlaskClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    events, done = parse_sse(resp.get_data(as_text=True))
    assert done
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text


def test_streaming_completion_without_usage_option_has_no_usage_chunk(
    client: FlaskClient,
) -> None:
    resp = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True},
    )
    events, done = parse_sse(resp.get_data(as_text=True))
    assert done and len(events) >= 1
    assert all("usage" not in e and len(e["choices"]) == 1 for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_health_and_ready_answer_when_booted(client: FlaskClient) -> None:
    assert client.get("/health").get_json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.get_json()["ready"] is True


def test_metrics_count_requests_and_tokens(client: FlaskClient) -> None:
    completion(client, prompt="Hi", max_tokens=2)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'tdllm_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert "tdllm_generated_tokens_total 2.0" in text
    assert "tdllm_ready 1.0" in text
    assert "tdllm_time_to_first_token_seconds_count 1.0" in text
    # the shared engine's KV budget (4 slots of the whole test context), nothing held after
    assert f"tdllm_kv_cache_budget_tokens {4 * CONTEXT}.0" in text
    assert "tdllm_kv_cache_reserved_tokens 0.0" in text


def test_request_id_is_echoed(client: FlaskClient) -> None:
    resp = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
