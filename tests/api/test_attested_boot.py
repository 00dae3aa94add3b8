"""Boot with a simulated TD against a simulated key broker on loopback HTTP."""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.identity import ServiceClaims, report_data, sealed_model_identity
from tdllm.api.local_service import free_port
from tdllm.sealing.writer import seal_checkpoint
from tdllm.settings import Settings, SettingsError
from tdllm_attest.abi import parse_quote
from tdllm_attest.broker.app import create_app as create_broker
from tdllm_attest.broker.protocol import from_b64url
from tdllm_attest.quote import SimulatedProvider
from tdllm_attest.simulated_qgs import create_qgs_app
from tests.attestation.simulated_broker import (
    TEST_KEY_ID,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)
from tests.sealing.synthetic import synthetic_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")


@pytest.fixture(scope="module")
def deployment() -> SimulatedDeployment:
    return simulated_deployment()


@pytest.fixture(scope="module")
def sealed_model(deployment: SimulatedDeployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sealed") / "tiny"
    seal_checkpoint(
        synthetic_checkpoint(),
        out,
        data_key=deployment.data_keys[TEST_KEY_ID],
        key_id=TEST_KEY_ID,
    )
    return out


class Broker:
    """The simulated broker served over real HTTP on `port`, started on demand."""

    def __init__(self, deployment: SimulatedDeployment, port: int) -> None:
        self.app = create_broker(deployment.settings)
        self.port = port
        self.server: BaseWSGIServer | None = None

    def start(self) -> None:
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def broker(deployment: SimulatedDeployment) -> Iterator[Broker]:
    running = Broker(deployment, free_port())
    yield running
    running.stop()


def service(
    deployment: SimulatedDeployment, sealed: Path, port: int, **fields: Any
) -> tuple[Flask, Any]:
    settings = Settings(
        model=str(sealed),
        attestation="simulated",
        allow_simulated=True,
        broker_url=f"http://127.0.0.1:{port}",
        key_id=TEST_KEY_ID,
        boot_attempts=40,
        boot_backoff_s=0.1,
        boot_backoff_max_s=0.2,
        context_tokens=64,
        max_prompt_tokens=32,
        max_tokens_limit=16,
        default_max_tokens=8,
    )
    deps = BootDeps(
        quote_provider=SimulatedProvider(deployment.platform, td_fields(**fields)),
        collateral=lambda _quote: deployment.platform.collateral_json(),
    )
    app = create_app(settings, boot_deps=deps)
    return app, app.extensions["tdllm"]


def wait_for(predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_broker_down_then_up_gives_not_ready_then_ready(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    app, svc = service(deployment, sealed_model, broker.port)
    client = app.test_client()
    wait_for(lambda: "unreachable" in svc.state.reason)
    resp = client.get("/ready")
    assert resp.status_code == 503 and "unreachable" in resp.get_json()["reason"]
    assert client.get("/health").status_code == 200
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).get_json()["error"]["code"] == "not_ready"
    broker.start()
    wait_for(lambda: svc.state.ready)
    assert client.get("/ready").status_code == 200
    doc = client.post("/v1/completions", json=body).get_json()
    assert doc["usage"]["completion_tokens"] >= 1
    svc.state.runner.stop()


def test_broker_refusal_leaves_the_service_not_ready_with_the_reason(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    broker.start()
    app, svc = service(deployment, sealed_model, broker.port, mr_td=b"\xee" * 48)
    wait_for(lambda: svc.state.phase == "failed")
    resp = app.test_client().get("/ready")
    assert resp.status_code == 503
    assert "refused" in resp.get_json()["reason"]


def _report_data(nonce: str, doc: dict[str, Any]) -> bytes:
    claims = ServiceClaims(doc["profile"], doc["model"], doc["reference_values_id"])
    return report_data(nonce, doc["service_public_key"], doc["signing_public_key"], claims)


def test_attestation_binds_the_nonce_and_the_service_key(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    app, svc = service(deployment, sealed_model, broker.port)  # needs no broker to attest
    client = app.test_client()
    nonce = secrets.token_hex(32)
    doc = client.get(f"/v1/attestation?nonce={nonce}").get_json()
    assert doc["simulated"] is True and "SIMULATED" in doc["warning"]
    quote = parse_quote(from_b64url(doc["quote"]))
    expected = _report_data(nonce, doc)
    assert quote.td_report.report_data == expected
    assert doc["service_public_key"] == svc.identity.public_jwk
    assert doc["model"] is None  # nothing is served before the engine runs
    assert client.get("/v1/attestation?nonce=zz").status_code == 400
    assert client.get("/v1/attestation").status_code == 400


def test_attestation_binds_the_identity_of_the_model_it_unsealed(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    broker.start()
    app, svc = service(deployment, sealed_model, broker.port)
    wait_for(lambda: svc.state.ready or svc.state.phase == "failed")
    assert svc.state.ready, svc.state.reason
    nonce = secrets.token_hex(32)
    doc = app.test_client().get(f"/v1/attestation?nonce={nonce}").get_json()
    manifest = json.loads((sealed_model / "sealed-model.json").read_text(encoding="utf-8"))
    sealed = doc["model"]["sealed"]
    assert sealed == sealed_model_identity(sealed_model)
    assert sealed["format"] == "tdllm-sealed/1"
    assert sealed["model_id"] == manifest["manifest"]["model_id"]
    assert doc["model"]["id"] == svc.state.runner.model_name and doc["profile"] == "td-only"
    quote = parse_quote(from_b64url(doc["quote"]))
    assert quote.td_report.report_data == _report_data(nonce, doc)
    svc.state.runner.stop()


def test_a_manifest_swapped_while_unsealing_fails_the_boot(
    deployment: SimulatedDeployment,
    sealed_model: Path,
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host owns the disk: the identity attested must be the manifest the MAC check saw."""
    import tdllm.sealing.reader as reader

    copy = tmp_path / "tiny"
    shutil.copytree(sealed_model, copy)
    real_open = reader.open_sealed

    def open_then_swap(path: Path, *args: Any, **kwargs: Any) -> Any:
        checkpoint = real_open(path, *args, **kwargs)
        manifest = path / "sealed-model.json"
        document = json.loads(manifest.read_text(encoding="utf-8"))
        document["manifest"]["name"] = "another model"
        manifest.write_text(json.dumps(document), encoding="utf-8")
        return checkpoint

    monkeypatch.setattr(reader, "open_sealed", open_then_swap)
    broker.start()
    _, svc = service(deployment, copy, broker.port)
    wait_for(lambda: svc.state.phase == "failed")
    assert "changed while it was opened" in svc.state.reason
    assert svc.state.sealed_model is None


class QuoteService:
    """The host's simulated quote service (simulated_qgs) over real HTTP."""

    def __init__(self, deployment: SimulatedDeployment, **fields: Any) -> None:
        app = create_qgs_app(deployment.platform, td_fields(**fields))
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _guest_settings(sealed: Path, broker: Broker, qgs: QuoteService) -> Settings:
    """What the image's smoke profile configures: no injected provider, only URLs."""
    return Settings(
        model=str(sealed),
        attestation="simulated",
        allow_simulated=True,
        simulated_quote_url=qgs.url,
        broker_url=f"http://127.0.0.1:{broker.port}",
        key_id=TEST_KEY_ID,
        context_tokens=64,
        max_prompt_tokens=32,
        max_tokens_limit=16,
        default_max_tokens=8,
    )


def test_a_guest_boots_from_settings_alone_with_the_hosts_simulated_quote_service(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    # what the image's smoke profile does: no injected provider or collateral; the quotes and
    # collateral come from the host's simulated QGS, whose platform the host's broker trusts
    broker.start()
    qgs = QuoteService(deployment)
    try:
        app = create_app(_guest_settings(sealed_model, broker, qgs))
        svc = app.extensions["tdllm"]
        wait_for(lambda: svc.state.ready or svc.state.phase == "failed")
        assert svc.state.ready, svc.state.reason
        client = app.test_client()
        nonce = secrets.token_hex(32)
        doc = client.get(f"/v1/attestation?nonce={nonce}").get_json()
        assert doc["simulated"] is True and doc["collateral"] is not None
        quote = parse_quote(from_b64url(doc["quote"]))
        expected = _report_data(nonce, doc)
        assert quote.td_report.report_data == expected
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).get_json()["usage"]["completion_tokens"]
        svc.state.runner.stop()
    finally:
        qgs.server.shutdown()


def test_a_quote_service_for_another_td_gets_the_key_refused(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    broker.start()
    qgs = QuoteService(deployment, mr_td=b"\xee" * 48)
    try:
        svc = create_app(_guest_settings(sealed_model, broker, qgs)).extensions["tdllm"]
        wait_for(lambda: svc.state.phase == "failed")
        assert "refused" in svc.state.reason
    finally:
        qgs.server.shutdown()


def test_simulated_quote_url_needs_the_simulated_mode() -> None:
    with pytest.raises(SettingsError, match="simulated_quote_url needs attestation 'simulated'"):
        Settings(attestation="tdx", simulated_quote_url="http://127.0.0.1:1")


def test_broker_without_current_collateral_gives_a_clear_not_ready_then_ready(
    sealed_model: Path,
) -> None:
    """The broker's PCCS is down: the TD retries (bounded) and /ready says why; no fallback."""
    from dataclasses import replace

    from tdllm_attest.collateral import FetcherCollateralSource

    down = {"now": True}
    deployment = simulated_deployment()
    served = deployment.platform.collateral_json()

    def pccs(_quote: bytes) -> str:
        if down["now"]:
            raise ConnectionError("PCCS unreachable")
        return served

    deployment = replace(
        deployment, settings=replace(deployment.settings, collateral=FetcherCollateralSource(pccs))
    )
    sealed = sealed_model.parent / "tiny-for-this-broker"
    seal_checkpoint(
        synthetic_checkpoint(),
        sealed,
        data_key=deployment.data_keys[TEST_KEY_ID],
        key_id=TEST_KEY_ID,
    )
    running = Broker(deployment, free_port())
    running.start()
    try:
        app, svc = service(deployment, sealed, running.port)
        wait_for(lambda: "no current attestation collateral" in svc.state.reason)
        resp = app.test_client().get("/ready")
        assert resp.status_code == 503 and "PCCS" in resp.get_json()["reason"]
        down["now"] = False
        wait_for(lambda: svc.state.ready)
        svc.state.runner.stop()
    finally:
        running.stop()
