"""/v1/attestation in the gpu-cc profile: the GPUs' evidence for the client's nonce, bound.

The service collects the evidence for each client nonce (over `gpu_nonce(nonce)`), serves it
beside the quote and binds its digest into REPORTDATA; the client SDK checks all of it. A GPU
that cannot attest now is a 503 (an outage), never an answer without its evidence.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm.settings import SettingsError
from tdllm_attest.client import new_nonce, verify_attestation
from tdllm_attest.client.attest import anchor_for
from tdllm_attest.errors import GpuEvidenceError
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.testing.gpu import SyntheticGpu
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import api_settings
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
NOW = datetime.now(UTC)
GPU_CC: dict[str, Any] = {
    "profile": "gpu-cc",
    "engine": "vllm",
    "vllm_python": "/nonexistent/python",  # never started: the engine runner is given
    "attestation": "simulated",
    "allow_simulated": True,
}


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(NOW)


@pytest.fixture(scope="module")
def gpu() -> SyntheticGpu:
    return SyntheticGpu(NOW)


def _app(runner: EngineRunner, platform: SimulatedTdxPlatform, source: Any) -> Any:
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
        gpu_evidence=source,
    )
    return create_app(api_settings(**GPU_CC), engine_runner=runner, boot_deps=deps)


def test_serves_gpu_evidence_for_the_clients_nonce_that_the_client_verifies(
    runner: EngineRunner, platform: SimulatedTdxPlatform, gpu: SyntheticGpu, tmp_path: Path
) -> None:
    client = _app(runner, platform, lambda nonce: [gpu.collect(nonce)]).test_client()
    nonce = new_nonce()
    doc = client.get(f"/v1/attestation?nonce={nonce}").get_json()
    assert doc["profile"] == "gpu-cc" and len(doc["gpu_evidence"]) == 1
    gpu.write_rims(tmp_path)
    policy = policy_for(platform, gpu={"driver_versions": [], "vbios_versions": []})
    attested = verify_attestation(
        doc,
        nonce,
        anchor_for(platform.root_der, SIMULATED),
        now=NOW,
        policy=policy,
        gpu_rims=RimStore.from_directory(tmp_path),
        gpu_anchors=gpu.anchors(environ=SIMULATED),
    )
    assert attested.gpus[0]["driver"] == gpu.driver_version and attested.gpus[0]["simulated"]


def test_a_gpu_that_cannot_attest_now_is_a_503_not_an_answer_without_it(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    def broken(_nonce: bytes) -> list[Any]:
        raise GpuEvidenceError("NVML: GPU is lost")

    resp = _app(runner, platform, broken).test_client().get(f"/v1/attestation?nonce={new_nonce()}")
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "gpu_evidence_failed"
    assert "NVML" not in resp.get_data(as_text=True)  # the cause goes to the log only


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"engine": "tdllm", "vllm_python": None}, "runs on engine 'vllm'"),
        ({"attestation": "none", "allow_simulated": False}, "needs attestation"),
        ({"attestation": "tdx", "gpu_evidence": "simulated"}, "needs attestation 'simulated'"),
        ({"gpu_evidence": "nvidia"}, "gpu_evidence must be one of"),
    ],
)
def test_settings_refuse_a_gpu_cc_deployment_that_cannot_attest_its_gpus(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        api_settings(**(GPU_CC | changes))
