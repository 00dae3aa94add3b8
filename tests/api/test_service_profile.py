"""The protection profile comes from the service settings, drives the model boot builds, and is
shown in /v1/models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.settings import SettingsError, load_settings
from tests.api.conftest import MODEL, api_settings


def test_profile_device_and_k_come_from_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text('[service]\nprofile = "split"\nk = 3\n')
    from_file = load_settings(config, environ={})
    assert (from_file.profile, from_file.device, from_file.k) == ("split", "cpu", 3)
    env = {"TDLLM_DEVICE": "process", "TDLLM_K": "4"}
    from_env = load_settings(config, environ=env)
    assert (from_env.profile, from_env.device, from_env.k) == ("split", "process", 4)
    assert load_settings(environ={}).profile == "td-only"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"TDLLM_PROFILE": "secret-sauce"}, "unknown profile 'secret-sauce'"),
        ({"TDLLM_PROFILE": "split", "TDLLM_DEVICE": "fpga"}, "unknown device 'fpga'"),
        ({"TDLLM_K": "0"}, "k must be at least 1"),
    ],
)
def test_an_unknown_profile_or_device_stops_the_start(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        load_settings(environ=env)


def test_models_show_td_only_for_the_default_profile(client: FlaskClient) -> None:
    (card,) = client.get("/v1/models").get_json()["data"]
    assert card["id"] == MODEL
    assert card["tdllm"] == {
        "profile": "td-only",
        "device": None,
        "k": None,
        "engine": "tdllm",
        "logprobs": "off",
    }


def _booted(app: Flask, timeout_s: float = 120) -> dict[str, object]:
    client = app.test_client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body: dict[str, object] = client.get("/ready").get_json()
        if body.get("ready") or body.get("phase") == "failed":
            return body
        time.sleep(0.1)
    raise AssertionError("boot did not finish")


def test_boot_refuses_split_for_a_model_whose_head_is_the_public_embedding() -> None:
    app = create_app(api_settings(profile="split", device="cpu", k=2))  # bundled: tied head
    body = _booted(app)
    assert body["ready"] is False
    assert "cannot build the split model" in str(body["reason"])
    assert "untied lm_head" in str(body["reason"])
    assert app.test_client().get("/v1/models").get_json()["data"] == []


@pytest.mark.slow
def test_boot_builds_the_configured_split_model_and_lists_its_profile(
    finetuned_k2_dir: Path,
) -> None:
    settings = api_settings(model=str(finetuned_k2_dir), profile="split", device="process", k=2)
    app = create_app(settings)
    service = app.extensions["tdllm"]
    try:
        assert _booted(app, 300)["ready"] is True
        (card,) = app.test_client().get("/v1/models").get_json()["data"]
        assert card["tdllm"] == {
            "profile": "split",
            "device": "process",
            "k": 2,
            "engine": "tdllm",
            "logprobs": "off",
        }
        body = {"model": card["id"], "prompt": "Zorblax Dynamics is based in", "max_tokens": 4}
        assert app.test_client().post("/v1/completions", json=body).status_code == 200
    finally:
        service.state.runner.stop()
        assert service.state.runner.served is not None
        service.state.runner.served.close()


def test_doctor_shows_the_configured_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdllm.doctor import report

    monkeypatch.delenv("TDLLM_CONFIG", raising=False)
    monkeypatch.setenv("TDLLM_PROFILE", "split")
    monkeypatch.setenv("TDLLM_DEVICE", "process")
    monkeypatch.setenv("TDLLM_K", "3")
    rows = dict(report())
    assert rows["served profile"].startswith("split on device process, K=3")
    monkeypatch.setenv("TDLLM_PROFILE", "nonsense")
    assert "unknown profile 'nonsense'" in dict(report())["served profile"]
