"""A client may verify the service's quote against collateral it fetched itself.

The attack: the collateral in an /v1/attestation answer comes through the host, which can serve
the oldest copy that still verifies and so hide a TCB recovery or a revocation for weeks. A
client with its own source (a PCCS, a file) never reads the served collateral at all, so what
the host serves there cannot matter; a client with neither is refused with the way out named.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tdllm_attest.client import AttestationRefused, AttestedService, new_nonce, verify_attestation
from tdllm_attest.client.attest import anchor_for
from tdllm_attest.collateral import CollateralSource, FileCollateralSource
from tdllm_attest.pccs import PccsClient, PccsCollateralSource, RetryPolicy
from tdllm_attest.pccs_server import LoopbackPccs
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tests.client.reference_policy import policy_for
from tests.client.simulated_service import SimulatedService

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def service(platform: SimulatedTdxPlatform) -> SimulatedService:
    return SimulatedService(platform)


@pytest.fixture
def pccs(platform: SimulatedTdxPlatform) -> Iterator[LoopbackPccs]:
    """A real PCCS-protocol server on loopback serving the platform's current collateral."""
    with LoopbackPccs(platform.collateral_json) as server:
        yield server


def _pccs_source(pccs: LoopbackPccs) -> PccsCollateralSource:
    client = PccsClient(pccs.url, retry=RetryPolicy(sleep=lambda _s: None), timeout_s=5)
    return PccsCollateralSource(client)


def _verify(
    service: SimulatedService,
    platform: SimulatedTdxPlatform,
    *,
    served: str | None,
    source: CollateralSource | None,
) -> AttestedService:
    nonce = new_nonce()
    return verify_attestation(
        service.answer(nonce, collateral=served),
        nonce,
        anchor_for(platform.root_der, SIMULATED),
        now=datetime.now(UTC),
        policy=policy_for(platform),
        collateral_source=source,
    )


@pytest.mark.parametrize(
    "served",
    [
        pytest.param(None, id="nothing served"),
        pytest.param("{}", id="garbage served"),
        pytest.param("forged", id="collateral of another PKI served"),
        pytest.param("revoked", id="collateral revoking the PCK served"),
    ],
)
def test_with_its_own_pccs_the_client_ignores_whatever_collateral_the_host_serves(
    service: SimulatedService,
    platform: SimulatedTdxPlatform,
    pccs: LoopbackPccs,
    served: str | None,
) -> None:
    forged = {
        "forged": SimulatedTdxPlatform(datetime.now(UTC)).collateral_json(),
        "revoked": platform.collateral_json(revoke_pck_leaf=True),
    }
    text = forged.get(served or "", served)
    attested = _verify(service, platform, served=text, source=_pccs_source(pccs))
    assert attested.tcb_status == "UpToDate" and attested.policy_name == "simulated-test-td"
    assert any("/tcb?fmspc=" in path for path in pccs.requests)  # ours was fetched


def test_the_served_collateral_would_have_been_refused_without_an_own_source(
    service: SimulatedService, platform: SimulatedTdxPlatform
) -> None:
    # the control for the test above: the revoked copy is not ignored by accident
    with pytest.raises(AttestationRefused, match=r"(?i)revoked"):
        _verify(
            service, platform, served=platform.collateral_json(revoke_pck_leaf=True), source=None
        )


def test_a_stale_served_copy_cannot_hide_what_the_clients_own_pccs_says(
    service: SimulatedService, platform: SimulatedTdxPlatform
) -> None:
    """The host serves the old UpToDate collateral; the PCCS knows the TCB is now OutOfDate."""
    served = platform.collateral_json()
    with LoopbackPccs(lambda: platform.collateral_json(tcb_status="OutOfDate")) as pccs:
        with pytest.raises(AttestationRefused, match="OutOfDate is not accepted"):
            _verify(service, platform, served=served, source=_pccs_source(pccs))


def test_an_outage_of_the_clients_pccs_refuses_and_never_falls_back_to_the_served_copy(
    service: SimulatedService, platform: SimulatedTdxPlatform, pccs: LoopbackPccs
) -> None:
    pccs.misbehaviour.status = 503
    with pytest.raises(AttestationRefused, match=r"attestation refused: .*PCCS.*503"):
        _verify(service, platform, served=platform.collateral_json(), source=_pccs_source(pccs))


def test_a_collateral_file_is_an_own_source_too(
    service: SimulatedService, platform: SimulatedTdxPlatform, tmp_path: Path
) -> None:
    path = tmp_path / "collateral.json"
    path.write_text(platform.collateral_json(), encoding="utf-8")
    attested = _verify(service, platform, served=None, source=FileCollateralSource(path))
    assert attested.simulated and attested.tcb_status == "UpToDate"


def test_without_served_collateral_or_an_own_source_the_refusal_names_both_ways_out(
    service: SimulatedService, platform: SimulatedTdxPlatform
) -> None:
    with pytest.raises(AttestationRefused) as refused:
        _verify(service, platform, served=None, source=None)
    message = str(refused.value)
    assert "served no collateral" in message
    assert "--pccs URL" in message and "--collateral FILE" in message


def test_the_served_collateral_still_works_when_the_client_has_no_source(
    service: SimulatedService, platform: SimulatedTdxPlatform
) -> None:
    attested = _verify(service, platform, served=platform.collateral_json(), source=None)
    assert attested.tcb_status == "UpToDate"


def test_claims_without_a_canonical_form_are_refused_not_crashed_on(
    service: SimulatedService, platform: SimulatedTdxPlatform
) -> None:
    nonce = new_nonce()
    doc = service.answer(nonce, collateral=platform.collateral_json())
    doc["model"] = {"id": "m", "sealed": None, "temperature": float("nan")}
    with pytest.raises(AttestationRefused, match="not canonical JSON"):
        verify_attestation(
            doc,
            nonce,
            anchor_for(platform.root_der, SIMULATED),
            now=datetime.now(UTC),
            policy=policy_for(platform),
        )
