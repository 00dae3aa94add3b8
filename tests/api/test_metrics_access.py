"""Who may read /metrics: per-request counters (prompt tokens, timings) are nobody else's business.

With API keys configured, /metrics needs one (the same check as /v1/); without keys it answers
only loopback peers. Refusals have the OpenAI error shape and carry no metric.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from tests.api.conftest import MODEL

KEY = "k" * 24
REMOTE = "203.0.113.5"


def _scrape(app: Flask, peer: str, key: str | None = None) -> tuple[int, str, dict[str, object]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    resp = app.test_client().get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": peer})
    with resp:  # closing it is what counts it in tdllm_requests_total
        return resp.status_code, resp.get_data(as_text=True), resp.get_json(silent=True) or {}


def test_metrics_refuses_an_unauthenticated_remote_scrape(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app()
    done = app.test_client().post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "a secret of exactly this length", "max_tokens": 1},
        environ_base={"REMOTE_ADDR": REMOTE},
    )
    assert done.status_code == 200
    status, text, body = _scrape(app, REMOTE)
    assert status == 403
    assert "tdllm_" not in text  # no prompt-token count, no timing
    error = body["error"]
    assert isinstance(error, dict)
    assert error["type"] == "permission_error" and error["code"] == "metrics_forbidden"


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_metrics_answers_a_loopback_scrape_when_no_keys_are_configured(
    make_app: Callable[..., Flask], peer: str
) -> None:
    status, text, _ = _scrape(make_app(), peer)
    assert status == 200
    assert "tdllm_ready 1.0" in text


@pytest.mark.parametrize("peer", ["::ffff:203.0.113.5", "10.0.0.7", "", "not-an-address"])
def test_metrics_refuses_every_non_loopback_peer(make_app: Callable[..., Flask], peer: str) -> None:
    assert _scrape(make_app(), peer)[0] == 403


def test_metrics_requires_the_api_key_when_keys_are_configured(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(api_keys=(KEY,))
    for peer in (REMOTE, "127.0.0.1"):  # loopback is no excuse once keys exist
        status, text, body = _scrape(app, peer)
        assert status == 401 and "tdllm_" not in text
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "invalid_api_key"
    assert _scrape(app, REMOTE, "x" * 24)[0] == 401
    status, text, _ = _scrape(app, REMOTE, KEY)
    assert status == 200 and "tdllm_ready 1.0" in text


def test_health_and_readiness_stay_open_to_remote_peers(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys=(KEY,)).test_client()
    assert client.get("/health", environ_base={"REMOTE_ADDR": REMOTE}).status_code == 200
    assert client.get("/ready", environ_base={"REMOTE_ADDR": REMOTE}).status_code == 200


def test_refused_scrapes_are_counted_without_leaking_anything(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app()
    assert _scrape(app, REMOTE)[0] == 403
    _, text, _ = _scrape(app, "127.0.0.1")
    assert 'tdllm_requests_total{endpoint="/metrics",status="403"} 1.0' in text
