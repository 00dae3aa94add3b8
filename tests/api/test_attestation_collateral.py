"""Where the service's attestation collateral comes from: the configured PCCS, on loopback here.

/v1/attestation serves collateral from the host's PCCS (`pccs_url`) with each quote, cached in
memory; a PCCS outage is a 503 with a clear code, never a quote with stale or missing collateral
passed off as current. During boot the TD sends the broker no collateral at all: the broker
verifies against its own, and its "collateral unavailable" answer is retried, then reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.client import anchor_for, new_nonce, verify_attestation
from tdllm_attest.pccs_server import LoopbackPccs
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import api_settings
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def pccs(platform: SimulatedTdxPlatform) -> Iterator[LoopbackPccs]:
    with LoopbackPccs(platform.collateral_json) as server:
        yield server


def _client(runner: EngineRunner, platform: SimulatedTdxPlatform, **settings: Any) -> FlaskClient:
    deps = BootDeps(quote_provider=SimulatedProvider(platform))  # no injected collateral
    config = api_settings(attestation="simulated", allow_simulated=True, **settings)
    return create_app(config, engine_runner=runner, boot_deps=deps).test_client()


def test_attestation_serves_collateral_from_the_pccs_and_the_client_verifies_it(
    runner: EngineRunner, platform: SimulatedTdxPlatform, pccs: LoopbackPccs
) -> None:
    client = _client(runner, platform, pccs_url=pccs.url)
    for _ in range(3):
        nonce = new_nonce()
        doc = client.get("/v1/attestation", query_string={"nonce": nonce}).get_json()
        attested = verify_attestation(
            doc,
            nonce,
            anchor_for(platform.root_der, SIMULATED),
            now=datetime.now(UTC),
            policy=policy_for(platform),
        )
        assert attested.simulated
    assert len(pccs.requests) == 4  # fetched once, then served from memory


def test_pccs_outage_is_a_503_with_a_clear_code(
    runner: EngineRunner, platform: SimulatedTdxPlatform, pccs: LoopbackPccs
) -> None:
    pccs.misbehaviour.status = 503
    client = _client(runner, platform, pccs_url=pccs.url)
    resp = client.get("/v1/attestation", query_string={"nonce": new_nonce()})
    assert resp.status_code == 503
    error = resp.get_json()["error"]
    assert error["code"] == "collateral_unavailable" and "PCCS" in error["message"]


def test_without_a_pccs_the_answer_carries_no_collateral(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    doc = _client(runner, platform).get("/v1/attestation", query_string={"nonce": new_nonce()})
    assert doc.get_json()["collateral"] is None


def test_a_malformed_pccs_url_is_a_settings_error() -> None:
    from tdllm.settings import SettingsError

    with pytest.raises(SettingsError, match="pccs_url"):
        api_settings(pccs_url="file:///etc/passwd")
