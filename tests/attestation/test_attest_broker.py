"""Key release end to end through Flask's test client: simulated TD -> broker -> JWE -> key.

Every refused attempt must yield no key AND burn the session: a retry on the same session with
otherwise perfect evidence is refused as an invalid session.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import requests
from jwcrypto import jwk  # type: ignore[import-untyped]
from werkzeug.serving import make_server

from tdllm_attest.abi import TD_ATTRIBUTE_DEBUG, TD_ATTRIBUTE_SEPT_VE_DISABLE
from tdllm_attest.broker.app import create_app
from tdllm_attest.broker.client import KeyReleaseError, RequestsTransport
from tdllm_attest.broker.protocol import (
    PATH_ATTEST,
    PATH_CHALLENGE,
    PROTOCOL,
    report_data_for,
)
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_attest.wire import b64url
from tests.attestation.simulated_broker import (
    OTHER_TEST_KEY_ID,
    PRODUCTION_KEY_ID,
    TEST_KEY_ID,
    FlaskTransport,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)

AUDIT = "tdllm_attest.broker.audit"
Body = dict[str, Any]


@pytest.fixture
def deployment() -> SimulatedDeployment:
    return simulated_deployment()


def test_simulated_td_obtains_its_data_key(deployment: SimulatedDeployment) -> None:
    transport = FlaskTransport(deployment.app_client())
    key = deployment.key_client(transport).fetch_key(TEST_KEY_ID)
    assert isinstance(key, bytearray)
    assert bytes(key) == deployment.data_keys[TEST_KEY_ID]


def test_replaying_a_successful_attest_request_is_refused(deployment: SimulatedDeployment) -> None:
    client = deployment.app_client()
    transport = FlaskTransport(client)
    deployment.key_client(transport).fetch_key(TEST_KEY_ID)
    path, body = transport.sent[-1]
    assert path == PATH_ATTEST
    replay = client.post(PATH_ATTEST, json=body)
    assert replay.status_code == 401
    assert replay.get_json()["type"] == "urn:tdllm:kb:error:invalid-session"


def _swap_key(body: Body) -> Body:
    other = jwk.JWK.generate(kty="OKP", crv="X25519").export_public(as_dict=True)
    return body | {"runtime_data": body["runtime_data"] | {"tee_pubkey": other}}


def _runtime(field: str, value: str) -> Callable[[Body], Body]:
    def change(body: Body) -> Body:
        return body | {"runtime_data": body["runtime_data"] | {field: value}}

    return change


@dataclass(frozen=True)
class Refusal:
    """One attack: how the request differs from an honest one, and what the broker answers."""

    fields: dict[str, Any] | None = None
    collateral: dict[str, Any] | None = None
    change_attest: Callable[[Body], Body] | None = None
    key_id: str = TEST_KEY_ID
    expire_session: bool = False
    status: int = 401
    problem: str = "evidence-rejected"
    audit_says: str = ""


REFUSALS = {
    "debug bit set": Refusal(
        fields={"td_attributes": TD_ATTRIBUTE_DEBUG | TD_ATTRIBUTE_SEPT_VE_DISABLE},
        status=403,
        problem="policy-refused",
        audit_says="Debug mode",
    ),
    "wrong MRTD": Refusal(
        fields={"mr_td": b"\xee" * 48}, status=403, problem="policy-refused", audit_says="mr_td"
    ),
    "out-of-date TCB": Refusal(
        collateral={"tcb_status": "OutOfDate"},
        status=403,
        problem="policy-refused",
        audit_says="OutOfDate",
    ),
    "revoked TCB": Refusal(
        collateral={"tcb_status": "Revoked"}, status=403, problem="policy-refused"
    ),
    "revoked PCK certificate": Refusal(collateral={"revoke_pck_leaf": True}, audit_says="revoked"),
    "nonce from elsewhere (replayed nonce)": Refusal(
        change_attest=_runtime("nonce", b64url(secrets.token_bytes(32))), audit_says="nonce"
    ),
    "expired session": Refusal(
        expire_session=True, problem="invalid-session", audit_says="expired"
    ),
    "swapped ephemeral public key": Refusal(change_attest=_swap_key, audit_says="REPORTDATA"),
    "runtime data names another key id": Refusal(
        change_attest=_runtime("key_id", OTHER_TEST_KEY_ID), audit_says="key_id"
    ),
    "production key for simulated evidence": Refusal(
        key_id=PRODUCTION_KEY_ID, status=403, problem="policy-refused", audit_says="production"
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS.values()), ids=list(REFUSALS))
def test_refused_attempt_yields_no_key_and_burns_the_session(
    deployment: SimulatedDeployment, case: Refusal, caplog: pytest.LogCaptureFixture
) -> None:
    client = deployment.app_client()
    originals: list[Body] = []

    def mutate(path: str, body: Body) -> Body:
        if path != PATH_ATTEST:
            return body
        originals.append(body)
        if case.expire_session:
            deployment.clock.now += timedelta(seconds=61)
        return case.change_attest(body) if case.change_attest else body

    transport = FlaskTransport(client, mutate=mutate)
    key_client = deployment.key_client(
        transport,
        fields=td_fields(**(case.fields or {})),
        collateral=deployment.platform.collateral_json(**(case.collateral or {})),
    )
    with caplog.at_level(logging.INFO, logger=AUDIT), pytest.raises(KeyReleaseError) as info:
        key_client.fetch_key(case.key_id)
    assert info.value.problem == {
        "type": f"urn:tdllm:kb:error:{case.problem}",
        "title": info.value.problem["title"],
        "status": case.status,
    }
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and case.audit_says in refusals[-1]

    # Retry on the same session with honest evidence: the session is gone.
    deployment.clock.now -= timedelta(seconds=61) if case.expire_session else timedelta(0)
    honest = originals[0]
    quote = SimulatedProvider(deployment.platform, td_fields()).get_quote(
        report_data_for(honest["runtime_data"])
    )
    retry = client.post(
        PATH_ATTEST,
        json=honest | {"quote": b64url(quote), "collateral": deployment.platform.collateral_json()},
    )
    assert retry.status_code == 401
    assert retry.get_json()["type"] == "urn:tdllm:kb:error:invalid-session"


def test_problem_body_carries_no_reason(deployment: SimulatedDeployment) -> None:
    resp = deployment.app_client().post(
        PATH_ATTEST, json={"session_id": "nope", "quote": "AA", "runtime_data": {}}
    )
    assert resp.status_code == 401
    assert resp.content_type == "application/problem+json"
    assert set(resp.get_json()) == {"type", "title", "status"}


def test_unknown_key_id_is_404(deployment: SimulatedDeployment) -> None:
    resp = deployment.app_client().post(
        PATH_CHALLENGE, json={"protocol": PROTOCOL, "tee": "tdx", "key_id": "model/none/0"}
    )
    assert resp.status_code == 404
    assert resp.get_json()["type"] == "urn:tdllm:kb:error:unknown-key"


def test_oversize_body_is_413() -> None:
    deployment = simulated_deployment(max_body_bytes=4096)
    resp = deployment.app_client().post(PATH_ATTEST, json={"session_id": "x", "quote": "A" * 8192})
    assert resp.status_code == 413
    assert resp.get_json()["type"] == "urn:tdllm:kb:error:body-too-large"


def test_client_over_the_rate_limit_gets_429_until_the_window_passes() -> None:
    deployment = simulated_deployment(rate_limit=3, rate_window=timedelta(seconds=10))
    client = deployment.app_client()
    body = {"protocol": PROTOCOL, "tee": "tdx", "key_id": TEST_KEY_ID}
    codes = [client.post(PATH_CHALLENGE, json=body).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.post(PATH_CHALLENGE, json=body).get_json()["type"].endswith("rate-limited")
    deployment.clock.now += timedelta(seconds=10)
    assert client.post(PATH_CHALLENGE, json=body).status_code == 200


def test_malformed_json_is_400(deployment: SimulatedDeployment) -> None:
    resp = deployment.app_client().post(
        PATH_CHALLENGE, data=b"{not json", content_type="application/json"
    )
    assert resp.status_code == 400


@pytest.fixture
def loopback_broker(deployment: SimulatedDeployment) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, create_app(deployment.settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


def test_key_release_over_a_real_loopback_socket(
    deployment: SimulatedDeployment, loopback_broker: str
) -> None:
    with requests.Session() as session:
        transport = RequestsTransport(loopback_broker, session=session, timeout_s=10)
        key = deployment.key_client(transport).fetch_key(TEST_KEY_ID)
    assert bytes(key) == deployment.data_keys[TEST_KEY_ID]


def test_broker_cli_serves_on_loopback_by_default() -> None:
    from click.testing import CliRunner

    from tdllm_attest.broker.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output
