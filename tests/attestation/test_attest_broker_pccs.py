"""The broker verifies against collateral it fetched itself, from a PCCS on loopback.

The attack: the host hands the TD (and so the broker) the oldest still-valid collateral, which can
hide a PCK revocation or a TCB recovery for weeks. The broker therefore ignores collateral in the
request, and a PCCS outage is a retryable 503, never a fallback to what the request carries.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import pytest

from tdllm_attest.broker.cli import settings_from_file
from tdllm_attest.broker.client import KeyReleaseError
from tdllm_attest.pccs import CollateralCache, PccsClient, PccsCollateralSource, RetryPolicy
from tdllm_attest.pccs_server import LoopbackPccs
from tests.attestation.simulated_broker import (
    SIM_NOW,
    TEST_KEY_ID,
    FlaskTransport,
    SimulatedDeployment,
    simulated_deployment,
)

pytestmark = pytest.mark.usefixtures("quiet_simulated_warnings")


def _pccs_source(pccs: LoopbackPccs, cache_dir: Path | None = None) -> PccsCollateralSource:
    client = PccsClient(pccs.url, retry=RetryPolicy(sleep=lambda _s: None), timeout_s=5)
    cache = CollateralCache(cache_dir) if cache_dir is not None else None
    return PccsCollateralSource(client, cache, now=lambda: SIM_NOW)


def _deployment_with_pccs(**changes: Any) -> tuple[SimulatedDeployment, LoopbackPccs]:
    deployment = simulated_deployment()
    pccs = LoopbackPccs(deployment.platform.collateral_json).start()
    return simulated_deployment_with(deployment, _pccs_source(pccs), **changes), pccs


def simulated_deployment_with(
    deployment: SimulatedDeployment, source: PccsCollateralSource, **changes: Any
) -> SimulatedDeployment:
    """The same platform and keys, the broker fetching its collateral from `source`."""
    settings = dataclasses.replace(deployment.settings, collateral=source, **changes)
    return dataclasses.replace(deployment, settings=settings)


def _release(deployment: SimulatedDeployment, *, request_collateral: str | None = None) -> bytes:
    client = deployment.key_client(FlaskTransport(deployment.app_client()))
    if request_collateral is not None:  # what a host would slip into the attest request
        client.collateral = lambda _quote: request_collateral
    return bytes(client.fetch_key(TEST_KEY_ID))


def test_broker_releases_the_key_with_collateral_from_its_pccs() -> None:
    deployment, pccs = _deployment_with_pccs()
    try:
        assert _release(deployment) == deployment.data_keys[TEST_KEY_ID]
        assert any(p.startswith("/tdx/certification/v4/tcb?fmspc=") for p in pccs.requests)
    finally:
        pccs.close()


def test_collateral_in_the_request_does_not_override_the_pccs() -> None:
    """The platform is OutOfDate per the PCCS; the host sends UpToDate collateral: refused."""
    deployment, pccs = _deployment_with_pccs(accept_request_collateral_insecure=True)
    platform = deployment.platform
    try:
        pccs.serve(lambda: platform.collateral_json(tcb_status="OutOfDate"))
        with pytest.raises(KeyReleaseError) as info:
            _release(deployment, request_collateral=platform.collateral_json())
        assert info.value.problem["type"].endswith("policy-refused")
    finally:
        pccs.close()


def test_pccs_outage_is_a_503_and_never_a_fallback_to_request_collateral() -> None:
    deployment, pccs = _deployment_with_pccs(accept_request_collateral_insecure=True)
    try:
        pccs.misbehaviour.status = 500
        with pytest.raises(KeyReleaseError) as info:
            _release(deployment, request_collateral=deployment.platform.collateral_json())
        assert info.value.problem == {
            "type": "urn:tdllm:kb:error:collateral-unavailable",
            "title": info.value.problem["title"],
            "status": 503,
        }
        assert len(pccs.requests) == 3  # bounded tries, then the refusal
    finally:
        pccs.close()


def test_request_collateral_is_ignored_without_the_insecure_switch() -> None:
    deployment = simulated_deployment(collateral=None)
    with pytest.raises(KeyReleaseError) as info:
        _release(deployment, request_collateral=deployment.platform.collateral_json())
    assert info.value.problem["type"].endswith("collateral-unavailable")
    insecure = simulated_deployment(collateral=None, accept_request_collateral_insecure=True)
    assert _release(insecure) == insecure.data_keys[TEST_KEY_ID]


def test_cached_collateral_serves_key_releases_while_the_pccs_is_down(tmp_path: Path) -> None:
    deployment = simulated_deployment()
    with LoopbackPccs(deployment.platform.collateral_json) as pccs:
        deployment = simulated_deployment_with(deployment, _pccs_source(pccs, tmp_path))
        _release(deployment)
        pccs.misbehaviour.drop_connection = True
        assert _release(deployment) == deployment.data_keys[TEST_KEY_ID]
        assert len(pccs.requests) == 4  # one fetch: TCB Info, QE Identity, two CRLs


def test_broker_config_without_a_pccs_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "broker.json"
    config.write_text(json.dumps({"mode": "production"}))
    with pytest.raises(click.UsageError, match="pccs_url is required"):
        settings_from_file(config)
