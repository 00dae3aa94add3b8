"""Concurrent requests share decode steps; logs never carry prompt text."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
from flask import Flask

from tdllm.api.runner import EngineRunner

from .conftest import MODEL


def test_four_simultaneous_requests_finish_and_are_batched(
    make_app: Callable[..., Flask], runner: EngineRunner
) -> None:
    app = make_app()
    before = runner.stats.steps
    runner.stats.max_decode_batch = 0
    results: list[int] = []
    barrier = threading.Barrier(4)

    def one(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 24}
        resp = client.post("/v1/completions", json=body)
        results.append(resp.get_json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4
    assert runner.stats.max_decode_batch > 1
    # batched: far fewer engine steps than the tokens generated
    assert runner.stats.steps - before < sum(results)


def test_disconnected_stream_is_cancelled_in_the_engine(
    make_app: Callable[..., Flask], runner: EngineRunner
) -> None:
    client = make_app().test_client()
    cancelled = runner.stats.cancelled
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 100, "stream": True}
    resp = client.post("/v1/completions", json=body, buffered=False)
    stream = resp.response
    next(iter(stream))  # first chunk arrives, then the client goes away
    resp.close()
    for _ in range(200):
        if runner.stats.cancelled > cancelled and runner.outstanding == 0:
            break
        threading.Event().wait(0.05)
    assert runner.stats.cancelled == cancelled + 1
    assert runner.outstanding == 0


def test_logs_never_contain_the_prompt_or_completion(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    marker = "zebra-quartz-lantern"
    client = make_app().test_client()
    caplog.set_level(logging.DEBUG)
    for path, body in [
        ("/v1/completions", {"model": MODEL, "prompt": f"My code is {marker}", "max_tokens": 4}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": 4},
        ),
        ("/v1/completions", {"model": MODEL, "prompt": marker, "bogus": marker}),
    ]:
        resp = client.post(path, json=body)
        resp.close()
    access = [r for r in caplog.records if r.name == "tdllm.api.access"]
    assert len(access) == 3
    assert all(r.fields["request_id"] for r in access)  # type: ignore[attr-defined]
    for record in caplog.records:
        assert marker not in record.getMessage()
        assert marker not in str(getattr(record, "fields", ""))
