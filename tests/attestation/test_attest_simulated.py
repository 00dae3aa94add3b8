"""Simulated TDX (UNSAFE test PKI): same verifier, only the anchor changes, behind two switches."""

from __future__ import annotations

import logging

import pytest

from tdllm_attest.abi import TD_ATTRIBUTE_DEBUG, parse_quote
from tdllm_attest.collateral import collateral_from_json
from tdllm_attest.errors import ChainError, CollateralError
from tdllm_attest.policy import check_tcb
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.trust import (
    ALLOW_SIMULATED_ENV,
    SimulationRefused,
    TrustAnchor,
    select_trust_anchor,
    simulated_trust_anchor,
)
from tdllm_attest.verify import verify_quote
from tests.attestation.attest_mutations import Vector
from tests.attestation.simulated_broker import SIM_NOW, SIMULATED_ENV


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(SIM_NOW)


def _anchor(platform: SimulatedTdxPlatform) -> TrustAnchor:
    return simulated_trust_anchor(platform.root_der, mode="simulated", environ=SIMULATED_ENV)


def test_simulated_quote_passes_the_production_verifier_with_the_gated_test_anchor(
    platform: SimulatedTdxPlatform,
) -> None:
    report_data = bytes(range(64))
    raw = platform.quote(SyntheticTdFields(report_data=report_data))
    verified = verify_quote(
        raw, collateral_from_json(platform.collateral_json()), now=SIM_NOW, anchor=_anchor(platform)
    )
    assert verified.tcb_status == "UpToDate"
    assert verified.simulated is True
    assert verified.quote.td_report.report_data == report_data
    assert any("dcap-qvl" in c.name and c.passed for c in verified.checks)


def test_simulated_quote_is_refused_by_the_intel_anchor(
    platform: SimulatedTdxPlatform, intel_anchor: TrustAnchor
) -> None:
    with pytest.raises(ChainError):
        verify_quote(
            platform.quote(),
            collateral_from_json(platform.collateral_json()),
            now=SIM_NOW,
            anchor=intel_anchor,
        )


def test_real_intel_quote_is_refused_by_the_test_anchor(
    platform: SimulatedTdxPlatform, v4: Vector
) -> None:
    with pytest.raises(ChainError):
        verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=_anchor(platform))


@pytest.mark.parametrize(
    ("mode", "environ"),
    [
        pytest.param("production", SIMULATED_ENV, id="config-says-production"),
        pytest.param("simulated", {}, id="env-switch-unset"),
        pytest.param("simulated", {ALLOW_SIMULATED_ENV: "yes"}, id="env-switch-not-exactly-1"),
        pytest.param("production", {}, id="both-off"),
    ],
)
def test_test_anchor_is_refused_unless_both_switches_are_on(
    platform: SimulatedTdxPlatform, mode: str, environ: dict[str, str]
) -> None:
    with pytest.raises(SimulationRefused):
        simulated_trust_anchor(platform.root_der, mode=mode, environ=environ)


def test_accepting_the_test_anchor_logs_a_warning_every_time(
    platform: SimulatedTdxPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tdllm_attest.trust"):
        _anchor(platform)
        _anchor(platform)
    assert sum("UNSAFE" in r.getMessage() for r in caplog.records) == 2


def test_production_mode_selects_intel_and_never_falls_back_to_the_test_root(
    platform: SimulatedTdxPlatform,
) -> None:
    anchor = select_trust_anchor(
        "production", simulated_root_der=platform.root_der, environ=SIMULATED_ENV
    )
    assert anchor.is_intel
    with pytest.raises(SimulationRefused):
        select_trust_anchor("simulated", simulated_root_der=None, environ=SIMULATED_ENV)
    with pytest.raises(SimulationRefused):
        select_trust_anchor("debug", simulated_root_der=platform.root_der, environ=SIMULATED_ENV)


def test_synthetic_fields_reach_the_quote(platform: SimulatedTdxPlatform) -> None:
    fields = SyntheticTdFields(
        mr_td=b"\xaa" * 48, rtmrs=(b"\x01" * 48,) * 4, td_attributes=TD_ATTRIBUTE_DEBUG
    )
    report = parse_quote(platform.quote(fields)).td_report
    assert report.mr_td == b"\xaa" * 48
    assert report.rtmr[3] == b"\x01" * 48
    assert report.debug


def test_out_of_date_collateral_yields_an_out_of_date_status_that_policy_refuses(
    platform: SimulatedTdxPlatform,
) -> None:
    from tdllm_attest.errors import TcbStatusError

    collateral = collateral_from_json(platform.collateral_json(tcb_status="OutOfDate"))
    verified = verify_quote(platform.quote(), collateral, now=SIM_NOW, anchor=_anchor(platform))
    assert verified.tcb_status == "OutOfDate"
    with pytest.raises(TcbStatusError):
        check_tcb(verified)


def test_revoked_simulated_pck_leaf_is_refused(platform: SimulatedTdxPlatform) -> None:
    collateral = collateral_from_json(platform.collateral_json(revoke_pck_leaf=True))
    with pytest.raises(ChainError, match="revoked"):
        verify_quote(platform.quote(), collateral, now=SIM_NOW, anchor=_anchor(platform))


def test_simulated_collateral_expires_like_real_collateral(platform: SimulatedTdxPlatform) -> None:
    from datetime import timedelta

    with pytest.raises((CollateralError, ChainError)):
        verify_quote(
            platform.quote(),
            collateral_from_json(platform.collateral_json()),
            now=SIM_NOW + timedelta(days=31),
            anchor=_anchor(platform),
        )
