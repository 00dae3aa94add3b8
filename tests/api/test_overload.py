"""A full inbox answers 429 with Retry-After in the OpenAI error shape: real concurrent requests
against the real service (gunicorn on loopback) with one batch slot and a one-request queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from tdllm_lab.local_service import LocalService

from .conftest import MODEL

# counting never runs into an end of sequence: the first request holds its slot for minutes
LONG: dict[str, Any] = {
    "model": MODEL,
    "prompt": "Count: 1, 2, 3, 4,",
    "max_tokens": 400,
    "temperature": 0,
}
SHORT: dict[str, Any] = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
DEADLINE_S = 120  # a loaded 2-core machine decodes a few tokens a second


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = tmp_path_factory.mktemp("gunicorn") / "service.log"
    settings = {"max_batch": "1", "queue_size": "1", "threads": "8"}
    with LocalService(ready_timeout_s=180, log=log, **settings) as running:
        yield running


def gauge(service: LocalService, name: str) -> float:
    text = requests.get(service.url + "/metrics", timeout=30).text
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


def wait_for(predicate: Any, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_full_inbox_answers_429_with_retry_after_and_takes_requests_again_once_drained(
    service: LocalService,
) -> None:
    url = service.url + "/v1/completions"
    # the batch slot: a stream the test holds open
    holder = requests.post(url, json=LONG | {"stream": True}, stream=True, timeout=DEADLINE_S)
    assert holder.status_code == 200
    lines = holder.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")  # it is decoding
    # the one queue place: a request that waits for the slot
    queued: dict[str, Any] = {}
    waiter = threading.Thread(
        target=lambda: queued.update(resp=requests.post(url, json=SHORT, timeout=DEADLINE_S))
    )
    waiter.start()
    wait_for(lambda: gauge(service, "tdllm_queue_depth") == 1)

    full = requests.post(url, json=SHORT, timeout=DEADLINE_S)
    assert full.status_code == 429
    assert full.headers["Retry-After"] == "1"
    assert full.headers["Content-Type"] == "application/json"
    assert full.json() == {
        "error": {
            "message": "the service is at capacity; retry after a short delay",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    with (
        openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0) as client,
        pytest.raises(openai.RateLimitError) as raised,
    ):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert raised.value.response.headers["Retry-After"] == "1"

    holder.close()  # the holder leaves: its slot goes to the queued request, then to new ones
    waiter.join(DEADLINE_S)
    assert queued["resp"].status_code == 200
    again = requests.post(url, json=SHORT, timeout=DEADLINE_S)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
