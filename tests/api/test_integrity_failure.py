"""A device caught lying stops the service: not ready with the reason, an alert, metrics.

The model is a tiny split model whose untrusted cpu device forges one hidden-state value at
its second call (the first decode step); the re-execution audit runs at f = 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from flask import Flask

from tdllm.api.app import create_app
from tdllm.api.logs import JsonFormatter
from tdllm.api.runner import EngineRunner
from tdllm.engine import Engine
from tdllm.model.loader import load_model
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import offload_public_prefix
from tdllm_lab.protection.private_model import privatize
from tests.api.conftest import api_settings
from tests.protection.conftest import CFG, MAX_BATCH, MAX_SEQ, K, checkpoint_of
from tests.protection.engine_runs import NoTokenizer
from tests.protection.test_tampering import LyingDevice, alter_one_value
from tests.tiny_model import tiny_tensors

PROMPT = [5, 17, 3, 42, 8]


def split_runner(device: LyingDevice | None) -> EngineRunner:
    base = tiny_tensors(CFG, seed=3)
    private = privatize(base.items(), CFG, K, seed=1)
    checkpoint = checkpoint_of("tiny-private", private)
    model, _ = load_model(checkpoint)
    crossing = Crossing(device) if device is not None else Crossing.open("cpu")
    reference = PublicReference.build("tiny-base", base.items())
    model.place(
        offload_public_prefix(model, checkpoint, reference, crossing, K, MAX_BATCH, MAX_SEQ, 1.0)
    )
    engine = Engine(model, NoTokenizer(), MAX_BATCH, MAX_SEQ)  # type: ignore[arg-type]
    protection = {"profile": "split", "device": "cpu", "k": K}
    return EngineRunner(engine, model_name="tiny-split", protection=protection)


def app_around(runner: EngineRunner) -> Flask:
    settings = api_settings(
        context_tokens=MAX_SEQ, max_prompt_tokens=16, max_tokens_limit=16, default_max_tokens=8
    )
    return create_app(settings, engine_runner=runner.start())


@pytest.fixture
def lying_app() -> Iterator[Flask]:
    runner = split_runner(LyingDevice(2, alter_one_value))
    yield app_around(runner)
    runner.stop()


def _metric(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


def test_a_lying_device_stops_serving_marks_not_ready_alerts_and_counts(
    lying_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = lying_app.test_client()
    assert client.get("/ready").status_code == 200
    assert client.get("/v1/models").get_json()["data"][0]["tdllm"]["profile"] == "split"

    with caplog.at_level(logging.INFO, logger="tdllm.api.runner"):
        first = client.post(
            "/v1/completions", json={"model": "tiny-split", "prompt": PROMPT, "max_tokens": 6}
        )
    assert first.status_code == 503
    assert "integrity failure" in first.get_json()["error"]["message"]

    ready = client.get("/ready")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["phase"] == "failed"
    assert body["reason"].startswith("integrity failure: re-execution audit failed")
    assert client.get("/v1/models").get_json()["data"] == []  # the model is no longer served
    with caplog.at_level(logging.INFO, logger="tdllm.api"):
        again = client.post(
            "/v1/completions", json={"model": "tiny-split", "prompt": PROMPT, "max_tokens": 2}
        )
    assert again.status_code == 503
    # a deliberate 503 is one log line, not an "unhandled" error with stack frames
    logged = [r.getMessage() for r in caplog.records if r.name == "tdllm.api"]
    assert logged and not any("unhandled" in m or 'File "' in m for m in logged)

    metrics = client.get("/metrics").get_data(as_text=True)
    assert _metric(metrics, "tdllm_integrity_failures_total") == 1
    assert _metric(metrics, "tdllm_ready") == 0
    assert _metric(metrics, 'tdllm_boot_phase{tdllm_boot_phase="failed"}') == 1

    alerts = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(alerts) == 1
    line = json.loads(JsonFormatter().format(alerts[0]))
    assert line["alert"] == "device_integrity"
    assert line["model"] == "tiny-split" and line["profile"] == "split"
    assert "ALERT" in line["message"]
    prompt_text = " ".join(map(str, PROMPT))
    assert prompt_text not in json.dumps(line) and "[5, 17, 3" not in json.dumps(line)


def test_an_honest_split_device_keeps_serving_and_lists_its_profile() -> None:
    runner = split_runner(None)
    try:
        client = app_around(runner).test_client()
        done = client.post(
            "/v1/completions", json={"model": "tiny-split", "prompt": PROMPT, "max_tokens": 4}
        )
        assert done.status_code == 200
        assert done.get_json()["usage"]["completion_tokens"] == 4
        card = client.get("/v1/models/tiny-split").get_json()
        assert card["tdllm"] == {
            "profile": "split",
            "device": "cpu",
            "k": K,
            "engine": "tdllm",
            "logprobs": "off",
        }
        assert client.get("/ready").status_code == 200
        metrics = client.get("/metrics").get_data(as_text=True)
        assert _metric(metrics, "tdllm_integrity_failures_total") == 0
    finally:
        runner.stop()
