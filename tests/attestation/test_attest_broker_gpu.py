"""The key broker and the gpu-cc profile: a key whose policy names GPUs is released only to a TD
that sends evidence of attested GPUs, made for this session and bound into its quote.

Attacks first (the host relays the attest request and may change anything in it): strip the GPU
evidence, swap in another GPU's, replay evidence made for an earlier session, show a GPU that
chains to another root, or one whose driver the policy does not allow, and add a key to
runtime_data the protocol does not have. Each must fail closed with the right problem type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest

from tdllm_attest.broker.cli import gpu_settings
from tdllm_attest.broker.client import KeyReleaseError
from tdllm_attest.gpu.policy import GpuPolicy
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.testing.gpu import SyntheticGpu
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    SIM_NOW,
    SIMULATED_ENV,
    TEST_KEY_ID,
    FlaskTransport,
    SimulatedDeployment,
    simulated_deployment,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")


@pytest.fixture(scope="module")
def gpu() -> SyntheticGpu:
    return SyntheticGpu(SIM_NOW)


def _deployment(
    gpu: SyntheticGpu, folder: Path, *, gpu_policy: GpuPolicy | None, rims: bool = True
) -> SimulatedDeployment:
    gpu.write_rims(folder)
    dep = simulated_deployment(
        gpu_rims=RimStore.from_directory(folder) if rims else None,
        gpu_anchors=gpu.anchors(environ=SIMULATED_ENV) if rims else None,
    )
    policy = dataclasses.replace(dep.settings.policies[POLICY_NAME], gpu=gpu_policy)
    dep.settings = dataclasses.replace(dep.settings, policies={POLICY_NAME: policy})
    return dep


def _fetch(
    dep: SimulatedDeployment,
    source: Callable[[bytes], Any] | None,
    mutate: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
) -> bytearray:
    transport = FlaskTransport(dep.app_client(), mutate=mutate)
    client = dep.key_client(transport)
    client.gpu_evidence = source
    return client.fetch_key(TEST_KEY_ID)


def _refusal(excinfo: pytest.ExceptionInfo[KeyReleaseError]) -> tuple[int, str]:
    problem = excinfo.value.problem
    return problem.get("status", 0), str(problem.get("type", "")).rsplit(":", 1)[-1]


def _policy(gpu: SyntheticGpu) -> GpuPolicy:
    return GpuPolicy(allowed_driver_versions=frozenset({gpu.driver_version}))


def test_releases_the_key_to_a_td_with_attested_gpus(gpu: SyntheticGpu, tmp_path: Path) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu))
    assert bytes(_fetch(dep, lambda nonce: [gpu.collect(nonce)])) == dep.data_keys[TEST_KEY_ID]


def test_refuses_a_gpu_cc_key_to_a_td_that_sends_no_gpu_evidence(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu))
    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, None)
    assert _refusal(excinfo) == (403, "policy-refused")


def test_rejects_gpu_evidence_stripped_from_the_request(gpu: SyntheticGpu, tmp_path: Path) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu))

    def strip(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "gpu_evidence"}

    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, lambda nonce: [gpu.collect(nonce)], strip)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_another_gpus_evidence_swapped_in_by_the_host(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    """The other GPU is genuine (same roots) and answered the same nonce: only the REPORTDATA
    binding tells the two apart."""
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu))
    other = gpu.sibling()
    seen: list[bytes] = []

    def source(nonce: bytes) -> list[Any]:
        seen.append(nonce)
        return [gpu.collect(nonce)]

    def swap(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "gpu_evidence" in body:
            body = body | {"gpu_evidence": [other.collect(seen[-1]).to_json()]}
        return body

    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, source, swap)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_gpu_evidence_replayed_from_an_earlier_session(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    """A TD (or a host feeding it) that shows evidence recorded for another nonce, bound
    consistently: the GPU did not sign this session's nonce."""
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu))
    recorded = gpu.collect(bytes(32))
    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, lambda _nonce: [recorded])
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_a_gpu_that_chains_to_another_root(gpu: SyntheticGpu, tmp_path: Path) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu))
    stranger = SyntheticGpu(SIM_NOW)  # its own "NVIDIA" roots, never configured at the broker
    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, lambda nonce: [stranger.collect(nonce)])
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_refuses_a_genuine_gpu_whose_driver_the_policy_does_not_allow(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    policy = GpuPolicy(allowed_driver_versions=frozenset({"999.99.99"}))
    dep = _deployment(gpu, tmp_path, gpu_policy=policy)
    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, lambda nonce: [gpu.collect(nonce)])
    assert _refusal(excinfo) == (403, "policy-refused")


def test_a_broker_without_gpu_reference_values_answers_collateral_unavailable(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=_policy(gpu), rims=False)
    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, lambda nonce: [gpu.collect(nonce)])
    assert _refusal(excinfo) == (503, "collateral-unavailable")


def test_a_policy_without_gpus_still_checks_the_binding_of_evidence_sent(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=None)
    released = _fetch(dep, lambda nonce: [gpu.collect(nonce)])
    assert bytes(released) == dep.data_keys[TEST_KEY_ID]

    def stale_digest(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "gpu_evidence" in body:
            body = body | {"gpu_evidence": [gpu.sibling().collect(bytes(32)).to_json()]}
        return body

    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, lambda nonce: [gpu.collect(nonce)], stale_digest)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_runtime_data_with_a_key_the_protocol_does_not_have(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    dep = _deployment(gpu, tmp_path, gpu_policy=None)

    def extra(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "runtime_data" in body:
            body = body | {"runtime_data": body["runtime_data"] | {"gpu": "none"}}
        return body

    with pytest.raises(KeyReleaseError) as excinfo:
        _fetch(dep, None, extra)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_broker_config_takes_rims_and_nvidias_roots_in_production(
    gpu: SyntheticGpu, tmp_path: Path
) -> None:
    gpu.write_rims(tmp_path)
    rims, anchors = gpu_settings({"mode": "production", "gpu_rims": str(tmp_path)})
    assert rims is not None and len(rims) == 2
    assert anchors is not None and anchors.is_nvidia
    assert gpu_settings({"mode": "production"}) == (None, None)


def test_broker_config_takes_simulated_gpu_roots_only_behind_both_switches(
    gpu: SyntheticGpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu.write_rims(tmp_path)
    (tmp_path / "device.der").write_bytes(gpu.device_root_der)
    (tmp_path / "rim.der").write_bytes(gpu.rim_root_der)
    doc = {
        "mode": "simulated",
        "gpu_rims": str(tmp_path),
        "simulated_gpu_roots": {
            "device": str(tmp_path / "device.der"),
            "rim": str(tmp_path / "rim.der"),
        },
    }
    monkeypatch.delenv("TDLLM_ALLOW_SIMULATED_TDX", raising=False)
    with pytest.raises(click.UsageError, match="TDLLM_ALLOW_SIMULATED_TDX"):
        gpu_settings(doc)
    monkeypatch.setenv("TDLLM_ALLOW_SIMULATED_TDX", "1")
    _rims, anchors = gpu_settings(doc)
    assert anchors is not None and not anchors.is_nvidia
    with pytest.raises(click.UsageError, match="gpu"):
        gpu_settings(doc | {"mode": "production"})  # production never takes test roots
