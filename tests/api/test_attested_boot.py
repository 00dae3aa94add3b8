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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.sealing.format import manifest_identity
from tdllm.settings import Settings, SettingsError
from tdllm_attest.abi import parse_quote
from tdllm_attest.broker.app import create_app as create_broker
from tdllm_attest.client.binding import ServiceClaims, report_data
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_attest.testing.qgs import create_qgs_app
from tdllm_attest.wire import from_b64url
from tdllm_lab.local_service import free_port
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.attestation.impostor_broker import ImpostorTransport
from tests.attestation.simulated_broker import (
    TEST_KEY_ID,
    TEST_MODEL,
    TEST_VERSION,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)
from tests.sealing.synthetic import synthetic_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")


@pytest.fixture(scope="module")
def deployment() -> SimulatedDeployment:
    return simulated_deployment()


def seal_test_model(deployment: SimulatedDeployment, out: Path, **changes: Any) -> Path:
    """The synthetic model sealed as the test key's record says (model, version), `changes`
    applied (the arguments of `seal_checkpoint`)."""
    options: dict[str, Any] = {
        "data_key": deployment.data_keys[TEST_KEY_ID],
        "key_id": TEST_KEY_ID,
        "model_name": TEST_MODEL,
        "model_version": TEST_VERSION,
    } | changes
    seal_checkpoint(options.pop("checkpoint", None) or synthetic_checkpoint(), out, **options)
    return out


@pytest.fixture(scope="module")
def sealed_model(deployment: SimulatedDeployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seal_test_model(deployment, tmp_path_factory.mktemp("sealed") / "tiny")


@pytest.fixture(scope="module")
def broker_public_key(
    deployment: SimulatedDeployment, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The broker key as the image pins it (a PEM file)."""
    return deployment.write_broker_public_key(tmp_path_factory.mktemp("image"))


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
    deployment: SimulatedDeployment,
    sealed: Path,
    port: int,
    *,
    settings: dict[str, Any] | None = None,
    transport: Any = None,
    **fields: Any,
) -> tuple[Flask, Any]:
    """The service booting `sealed` against the broker on `port` (or `transport`), its quotes
    carrying `fields`, `settings` changed; the image pins `deployment`'s broker key."""
    pinned = deployment.write_broker_public_key(sealed.parent)
    options: dict[str, Any] = {
        "model": str(sealed),
        "attestation": "simulated",
        "allow_simulated": True,
        "broker_url": f"http://127.0.0.1:{port}",
        "broker_public_key": str(pinned),
        "key_id": TEST_KEY_ID,
        "boot_attempts": 400,  # a loaded CI machine must not outwait the boot (tests flip it)
        "boot_backoff_s": 0.1,
        "boot_backoff_max_s": 0.2,
        "context_tokens": 64,
        "max_prompt_tokens": 32,
        "max_tokens_limit": 16,
        "default_max_tokens": 8,
    }
    deps = BootDeps(
        quote_provider=SimulatedProvider(deployment.platform, td_fields(**fields)),
        transport=transport,
        collateral=lambda _quote: deployment.platform.collateral_json(),
    )
    settings_ = Settings(**(options | (settings or {})))
    app = create_app(settings_, boot_deps=deps)
    BOOTING.append(app.extensions["tdllm"])
    return app, app.extensions["tdllm"]


BOOTING: list[Any] = []  # this test's services, whose boot ends with it


@pytest.fixture(autouse=True)
def stop_booting() -> Iterator[None]:
    """A service whose broker never came up retried it long after its test (400 attempts,
    logging into later tests): each test's boots are stopped as a stopping service's are."""
    yield
    while BOOTING:
        svc = BOOTING.pop()
        svc.state.stop_booting()
        svc.boot.thread.join(60)


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
    assert sealed == manifest_identity(manifest["manifest"])
    assert sealed["format"] == "tdllm-sealed/1"
    assert sealed["model_id"] == manifest["manifest"]["model_id"]
    assert doc["model"]["id"] == svc.state.runner.model_name and doc["profile"] == "td-only"
    quote = parse_quote(from_b64url(doc["quote"]))
    assert quote.td_report.report_data == _report_data(nonce, doc)
    svc.state.runner.stop()


def test_the_attested_identity_is_the_manifest_that_was_authenticated_not_the_disk(
    deployment: SimulatedDeployment,
    sealed_model: Path,
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host owns the disk: it swaps in another authentic sealing (same key, model and
    version) for the unsealing and puts the first back once the TD serves. The claim must name
    the model actually loaded, whatever the disk says when a client asks."""
    import tdllm.sealing.reader as reader

    shown, loaded, aside = tmp_path / "tiny", tmp_path / "other", tmp_path / "aside"
    shutil.copytree(sealed_model, shown)
    seal_test_model(deployment, loaded)  # the same model and version, sealed once more
    real_open = reader.open_sealed

    def swapped_for_the_open(path: Path, *args: Any, **kwargs: Any) -> Any:
        path.rename(aside)
        shutil.copytree(loaded, path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(reader, "open_sealed", swapped_for_the_open)
    broker.start()
    app, svc = service(deployment, shown, broker.port)
    wait_for(lambda: svc.state.ready or svc.state.phase == "failed")
    assert svc.state.ready, svc.state.reason
    shutil.rmtree(shown)
    aside.rename(shown)  # the disk shows the first sealing again
    doc = app.test_client().get(f"/v1/attestation?nonce={secrets.token_hex(32)}").get_json()
    identity = {
        name: json.loads((folder / "sealed-model.json").read_text(encoding="utf-8"))["manifest"]
        for name, folder in (("shown", shown), ("loaded", loaded))
    }
    assert identity["shown"]["model_id"] != identity["loaded"]["model_id"]
    assert doc["model"]["sealed"] == manifest_identity(identity["loaded"])
    svc.state.runner.stop()


class QuoteService:
    """The host's simulated quote service (testing.qgs) over real HTTP."""

    def __init__(self, deployment: SimulatedDeployment, **fields: Any) -> None:
        app = create_qgs_app(deployment.platform, td_fields(**fields))
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _guest_settings(
    sealed: Path, broker: Broker, qgs: QuoteService, pinned_broker_key: Path
) -> Settings:
    """What the image's smoke profile configures: no injected provider, only URLs."""
    return Settings(
        model=str(sealed),
        attestation="simulated",
        allow_simulated=True,
        simulated_quote_url=qgs.url,
        broker_url=f"http://127.0.0.1:{broker.port}",
        broker_public_key=str(pinned_broker_key),
        key_id=TEST_KEY_ID,
        context_tokens=64,
        max_prompt_tokens=32,
        max_tokens_limit=16,
        default_max_tokens=8,
    )


def test_a_guest_boots_from_settings_alone_with_the_hosts_simulated_quote_service(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker, broker_public_key: Path
) -> None:
    # what the image's smoke profile does: no injected provider or collateral; the quotes and
    # collateral come from the host's simulated QGS, whose platform the host's broker trusts
    broker.start()
    qgs = QuoteService(deployment)
    try:
        app = create_app(_guest_settings(sealed_model, broker, qgs, broker_public_key))
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
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker, broker_public_key: Path
) -> None:
    broker.start()
    qgs = QuoteService(deployment, mr_td=b"\xee" * 48)
    try:
        guest = _guest_settings(sealed_model, broker, qgs, broker_public_key)
        svc = create_app(guest).extensions["tdllm"]
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
    sealed = seal_test_model(deployment, sealed_model.parent / "tiny-for-this-broker")
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


# --- which model, which version, and from whom (the host owns the disk and the network) -------


def _failed_boot(deployment: SimulatedDeployment, sealed: Path, broker: Broker, **kw: Any) -> str:
    app, svc = service(deployment, sealed, broker.port, **kw)
    wait_for(lambda: svc.state.phase == "failed" or svc.state.ready)
    assert not svc.state.ready and svc.state.runner is None
    resp = app.test_client().get("/ready")
    assert resp.status_code == 503
    assert resp.get_json()["reason"] == svc.state.reason
    return str(svc.state.reason)


def test_rolled_back_sealed_model_does_not_boot(
    deployment: SimulatedDeployment, broker: Broker, tmp_path: Path
) -> None:
    """The host puts the owner's older version back on the disk. It is genuine and opens with
    the same data key (a broker may reuse one key across versions), but the broker released
    the key for the current version only."""
    broker.start()
    old = seal_test_model(deployment, tmp_path / "v1", model_version=TEST_VERSION - 1)
    reason = _failed_boot(deployment, old, broker)
    assert "refusing the released key" in reason
    assert f"is model {TEST_MODEL!r} version {TEST_VERSION - 1}" in reason
    assert f"released for model {TEST_MODEL!r} version {TEST_VERSION}" in reason


def test_td_refuses_a_key_for_another_model(
    deployment: SimulatedDeployment, broker: Broker, tmp_path: Path
) -> None:
    sealed = seal_test_model(deployment, tmp_path / "other", model_name="another-model")
    broker.start()
    reason = _failed_boot(deployment, sealed, broker)
    assert "is model 'another-model'" in reason and f"released for model {TEST_MODEL!r}" in reason


def test_td_refuses_a_key_below_its_min_model_version(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    """The image's own floor holds even when the broker's policy still lets the key go."""
    broker.start()
    settings = {"min_model_version": TEST_VERSION + 1}
    reason = _failed_boot(deployment, sealed_model, broker, settings=settings)
    assert f"below this image's min_model_version {TEST_VERSION + 1}" in reason


def test_td_boots_a_model_at_its_min_model_version(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker
) -> None:
    broker.start()
    settings = {"min_model_version": TEST_VERSION}
    _, svc = service(deployment, sealed_model, broker.port, settings=settings)
    wait_for(lambda: svc.state.ready or svc.state.phase == "failed")
    assert svc.state.ready, svc.state.reason
    svc.state.runner.stop()


def _host_sealed_model(tmp_path: Path) -> tuple[bytes, Path]:
    """A model the host sealed itself under its own key, named like the owner's."""
    host_key = secrets.token_bytes(32)
    sealed = tmp_path / "host-model"
    seal_checkpoint(
        synthetic_checkpoint(seed=7),
        sealed,
        data_key=host_key,
        key_id=TEST_KEY_ID,
        model_name=TEST_MODEL,
        model_version=TEST_VERSION,
    )
    return host_key, sealed


@pytest.mark.parametrize("signed", [True, False], ids=["signed by its own key", "unsigned"])
def test_td_refuses_an_answer_from_an_impostor_broker(
    deployment: SimulatedDeployment, broker: Broker, tmp_path: Path, signed: bool
) -> None:
    """The host answers in the broker's place: it gets a genuine quote and returns its own key
    for its own (say, prompt-logging) model. Final at once: no retry, no key used."""
    host_key, sealed = _host_sealed_model(tmp_path)
    own_key = Ed25519PrivateKey.generate() if signed else None
    impostor = ImpostorTransport(host_key, TEST_MODEL, TEST_VERSION, own_key)
    reason = _failed_boot(deployment, sealed, broker, transport=impostor)
    assert "refusing the key broker's answer" in reason
    assert ("pinned broker key" if signed else "not signed") in reason
    assert len(impostor.quotes) == 1


def test_sealed_boot_needs_a_pinned_broker_key(sealed_model: Path) -> None:
    with pytest.raises(SettingsError, match="broker_public_key"):
        Settings(
            model=str(sealed_model),
            attestation="simulated",
            allow_simulated=True,
            broker_url="http://127.0.0.1:1",
            key_id=TEST_KEY_ID,
        )


def test_a_pinned_broker_key_that_does_not_load_fails_the_boot_clearly(
    deployment: SimulatedDeployment, sealed_model: Path, broker: Broker, tmp_path: Path
) -> None:
    not_a_key = tmp_path / "broker.pub.pem"
    not_a_key.write_text("not a key")
    broker.start()
    settings = {"broker_public_key": str(not_a_key)}
    reason = _failed_boot(deployment, sealed_model, broker, settings=settings)
    assert f"cannot load the pinned broker public key {not_a_key}" in reason
