"""Builders for broker tests: a simulated platform, a matching policy, a broker and a TD client."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flask.testing import FlaskClient

from tdllm_attest.broker.app import create_app
from tdllm_attest.broker.client import KeyClient
from tdllm_attest.broker.keystore import Keystore
from tdllm_attest.broker.settings import BrokerSettings
from tdllm_attest.broker.signing import public_pem
from tdllm_attest.collateral import FetcherCollateralSource
from tdllm_attest.policy_format import MeasurementTuple, Policy, TcbPolicy
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_attest.trust import ALLOW_SIMULATED_ENV, select_trust_anchor

SIM_NOW = datetime(2026, 1, 15, 12, tzinfo=UTC)
SIMULATED_ENV = {ALLOW_SIMULATED_ENV: "1"}
TEST_KEY_ID = "model/test/1"
OTHER_TEST_KEY_ID = "model/other/1"
PRODUCTION_KEY_ID = "model/prod/1"
# the model and version each test key unlocks (its keystore record; the sealed manifest's too)
TEST_MODEL, TEST_VERSION = "test-model", 2
KEY_MODELS = {
    TEST_KEY_ID: (TEST_MODEL, TEST_VERSION),
    OTHER_TEST_KEY_ID: ("other-model", 1),
    PRODUCTION_KEY_ID: ("prod-model", 1),
}
POLICY_NAME = "simulated-appliance"
MR_TD = bytes(range(48))
RTMRS = (b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, bytes(48))


def td_fields(**changes: Any) -> SyntheticTdFields:
    """The synthetic TD the test policy expects, with `changes` applied."""
    base: dict[str, Any] = {"mr_td": MR_TD, "rtmrs": RTMRS} | changes
    return SyntheticTdFields(**base)


def policy_for_template(platform: SimulatedTdxPlatform) -> Policy:
    """A policy that the default synthetic TD (`td_fields()`) satisfies."""
    from tdllm_attest.abi import parse_quote

    report = parse_quote(platform.quote(td_fields())).td_report
    return Policy(
        name=POLICY_NAME,
        tcb=TcbPolicy(),
        xfam=frozenset({report.xfam}),
        measurements=(MeasurementTuple("sim", MR_TD, RTMRS[0], RTMRS[1], RTMRS[2]),),
        mr_config_id=report.mr_config_id,
        mr_owner=report.mr_owner,
        mr_owner_config=report.mr_owner_config,
        rtmr3="zero",
    )


@dataclass
class FakeClock:
    """A settable clock for the broker."""

    now: datetime = SIM_NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FlaskTransport:
    """Adapts Flask's test client to the key client's `Transport`."""

    client: FlaskClient
    mutate: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.mutate is not None:
            body = self.mutate(path, body)
        self.sent.append((path, body))
        resp = self.client.post(path, json=body)
        doc = resp.get_json(silent=True)
        return resp.status_code, doc if isinstance(doc, dict) else {}


@dataclass
class ServedCollateral:
    """What the broker's own collateral source (its PCCS, in production) currently serves."""

    text: str

    def __call__(self, _raw_quote: bytes) -> str:
        return self.text


@dataclass
class SimulatedDeployment:
    """A simulated platform, a broker (Flask app) and the data keys it holds."""

    platform: SimulatedTdxPlatform
    clock: FakeClock
    settings: BrokerSettings
    data_keys: dict[str, bytes]
    served_collateral: ServedCollateral

    def app_client(self) -> FlaskClient:
        return create_app(self.settings).test_client()

    @property
    def broker_public_key(self) -> Ed25519PublicKey:
        """What the TD's image pins: the public half of the broker's answer-signing key."""
        return self.settings.signing_key.public_key()

    def write_broker_public_key(self, folder: Path) -> Path:
        """The pinned key as the service reads it (`broker_public_key`: a PEM file)."""
        path = folder / "broker.pub.pem"
        path.write_bytes(public_pem(self.settings.signing_key))
        return path

    def key_client(
        self,
        transport: Any,
        *,
        fields: SyntheticTdFields | None = None,
        collateral: str | None = None,
        broker_key: Ed25519PublicKey | None = None,
    ) -> KeyClient:
        """A TD's key client; `collateral` is what the broker's own source serves meanwhile
        (under `accept_request_collateral_insecure` the TD also sends it in its request);
        `broker_key` is the key it pins (default: this broker's)."""
        text = collateral if collateral is not None else self.platform.collateral_json()
        self.served_collateral.text = text
        insecure = self.settings.accept_request_collateral_insecure
        return KeyClient(
            transport=transport,
            provider=SimulatedProvider(self.platform, fields or td_fields()),
            broker_key=broker_key or self.broker_public_key,
            collateral=(lambda _quote: text) if insecure else None,
        )


def simulated_deployment(
    *, now: datetime = SIM_NOW, **settings_changes: Any
) -> SimulatedDeployment:
    """Generate a fresh simulated PKI, a keystore with test and production keys, and settings;
    the platform's collateral and the broker's clock stand at `now`."""
    platform = SimulatedTdxPlatform(now)
    keystore = Keystore([], secrets.token_bytes(32))
    data_keys = {k: secrets.token_bytes(32) for k in (TEST_KEY_ID, OTHER_TEST_KEY_ID)}
    data_keys[PRODUCTION_KEY_ID] = secrets.token_bytes(32)
    for key_id, modes in (
        (TEST_KEY_ID, {"simulated"}),
        (OTHER_TEST_KEY_ID, {"simulated"}),
        (PRODUCTION_KEY_ID, {"production"}),
    ):
        model, version = KEY_MODELS[key_id]
        keystore.wrap(key_id, POLICY_NAME, modes, data_keys[key_id], model=model, version=version)
    clock = FakeClock(now)
    anchor = select_trust_anchor(
        "simulated", simulated_root_der=platform.root_der, environ=SIMULATED_ENV
    )
    served = ServedCollateral(platform.collateral_json())
    options: dict[str, Any] = {
        "session_ttl": timedelta(seconds=60),
        "collateral": FetcherCollateralSource(served),
    } | settings_changes
    settings = BrokerSettings(
        keystore=keystore,
        policies={POLICY_NAME: policy_for_template(platform)},
        anchor=anchor,
        signing_key=Ed25519PrivateKey.generate(),
        now=clock,
        **options,
    )
    return SimulatedDeployment(platform, clock, settings, data_keys, served)
