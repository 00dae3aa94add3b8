"""A client that leaves mid-stream frees its engine slot at once: the real service (gunicorn on
loopback) with one batch slot; the engine's own token counter (/metrics) shows the abandoned
generation stopped within a few tokens, not at its max_tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tdllm_lab.local_service import LocalService

from .conftest import MODEL

MAX_TOKENS = 400  # minutes of decoding here: reaching it would blow every deadline below
# counting never runs into an end of sequence, so only a cancel ends this one early
LONG: dict[str, Any] = {
    "model": MODEL,
    "prompt": "Count: 1, 2, 3, 4,",
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
}
NEXT: dict[str, Any] = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
DEADLINE_S = 120  # a loaded 2-core machine decodes a few tokens a second
# tokens the abandoned stream may still make: those already in the client's read buffer, the
# write that finds the socket closed comes a token or two after the client left, then the
# cancel waits for the step in progress (6 in all here, typically)
LATE_TOKENS = 12


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = tmp_path_factory.mktemp("gunicorn") / "service.log"
    with LocalService(ready_timeout_s=180, log=log, max_batch="1", threads="8") as running:
        yield running


def generated_tokens(service: LocalService) -> float:
    text = requests.get(service.url + "/metrics", timeout=30).text
    name = "tdllm_generated_tokens_total"
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[1])


def test_a_client_leaving_mid_stream_frees_the_only_slot_for_the_next_request_at_once(
    service: LocalService,
) -> None:
    url = service.url + "/v1/completions"
    before = generated_tokens(service)
    stream = requests.post(url, json=LONG | {"stream": True}, stream=True, timeout=DEADLINE_S)
    events = (line for line in stream.iter_lines() if line.startswith(b"data: {"))
    for _ in range(3):
        next(events)  # decoding: three tokens arrived
    stream.close()  # the client goes away without reading the rest

    resp = requests.post(url, json=NEXT, timeout=DEADLINE_S)  # one slot: it needs the freed one
    assert resp.status_code == 200, resp.text
    made = resp.json()["usage"]["completion_tokens"]
    abandoned = generated_tokens(service) - before - made
    assert 3 <= abandoned <= 3 + LATE_TOKENS, f"the abandoned stream made {abandoned} tokens"
