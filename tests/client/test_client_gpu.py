"""A client checks the GPUs of a gpu-cc service before a prompt leaves its machine.

In the gpu-cc profile prompts are decrypted on a GPU, so the quote alone proves too little: the
answer must carry evidence of confidential-computing GPUs made for the client's own nonce, bound
into REPORTDATA, chained to the GPU roots the client trusts, with measurements matching NVIDIA's
signed reference values and a driver/VBIOS the reference-values policy allows. The host serves
the answer and may strip, swap or replay the evidence; each attempt is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tdllm_attest.client import AttestationRefused, AttestedService, new_nonce, verify_attestation
from tdllm_attest.client.attest import anchor_for, require_e2e_profile
from tdllm_attest.client.binding import ServiceClaims
from tdllm_attest.client.receipt import ReceiptRefused, verify_receipt
from tdllm_attest.client.receipt_protocol import (
    RECEIPT_FIELD,
    RECEIPTS_NONCE,
    body_sha256,
    receipt_of,
    sign_receipt,
)
from tdllm_attest.gpu.anchors import GpuAnchors
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.policy_format import Policy
from tdllm_attest.testing.gpu import SyntheticGpu
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tests.client.reference_policy import policy_for
from tests.client.simulated_service import BODY, MODEL, SimulatedService, receipt_fields
from tests.client.simulated_service import NOW as RECEIPT_TIME

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
NOW = datetime.now(UTC)
GPU_CC = ServiceClaims("gpu-cc", MODEL, None)


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(NOW)


@pytest.fixture(scope="module")
def gpu() -> SyntheticGpu:
    return SyntheticGpu(NOW)


@pytest.fixture(scope="module")
def rims(gpu: SyntheticGpu, tmp_path_factory: pytest.TempPathFactory) -> RimStore:
    folder = tmp_path_factory.mktemp("rims")
    gpu.write_rims(folder)
    return RimStore.from_directory(folder)


@pytest.fixture(scope="module")
def anchors(gpu: SyntheticGpu) -> GpuAnchors:
    return gpu.anchors(environ=SIMULATED)


def _gpu_policy(platform: SimulatedTdxPlatform, driver: str) -> Policy:
    return policy_for(platform, gpu={"driver_versions": [driver], "vbios_versions": []})


def _verify(
    service: SimulatedService,
    platform: SimulatedTdxPlatform,
    *,
    policy: Policy,
    rims: RimStore | None,
    anchors: GpuAnchors,
    change: Any = None,
) -> AttestedService:
    nonce = new_nonce()
    doc = service.answer(nonce, collateral=platform.collateral_json())
    if change is not None:
        change(doc)
    return verify_attestation(
        doc,
        nonce,
        anchor_for(platform.root_der, SIMULATED),
        now=NOW,
        policy=policy,
        gpu_rims=rims,
        gpu_anchors=anchors,
    )


def test_accepts_a_gpu_cc_service_whose_gpus_attest(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu, gpu.sibling()))
    policy = _gpu_policy(platform, gpu.driver_version)
    attested = _verify(service, platform, policy=policy, rims=rims, anchors=anchors)
    assert attested.profile == "gpu-cc" and len(attested.gpus) == 2
    require_e2e_profile(attested)  # prompts may go end to end to an attested GPU


def test_refuses_a_gpu_cc_service_that_attests_no_gpu(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    service = SimulatedService(platform, claims=GPU_CC)
    policy = _gpu_policy(platform, gpu.driver_version)
    with pytest.raises(AttestationRefused, match="served no GPU evidence"):
        _verify(service, platform, policy=policy, rims=rims, anchors=anchors)


def test_refuses_an_answer_whose_gpu_evidence_the_host_stripped(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))

    def strip(doc: dict[str, Any]) -> None:
        del doc["gpu"], doc["gpu_evidence"]

    with pytest.raises(AttestationRefused, match="REPORTDATA does not bind"):
        _verify(
            service,
            platform,
            policy=_gpu_policy(platform, gpu.driver_version),
            rims=rims,
            anchors=anchors,
            change=strip,
        )


def test_refuses_another_gpus_evidence_for_the_same_nonce(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    """The other GPU is genuine and answered our nonce (the host asked it): only the digest
    REPORTDATA binds tells them apart."""
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))
    other = SimulatedService(platform, claims=GPU_CC, gpus=(gpu.sibling(),))
    nonce = new_nonce()
    doc = service.answer(nonce, collateral=platform.collateral_json())
    doc["gpu_evidence"] = other.answer(nonce, collateral=None)["gpu_evidence"]
    with pytest.raises(AttestationRefused, match="not the evidence REPORTDATA binds"):
        verify_attestation(
            doc,
            nonce,
            anchor_for(platform.root_der, SIMULATED),
            now=NOW,
            policy=_gpu_policy(platform, gpu.driver_version),
            gpu_rims=rims,
            gpu_anchors=anchors,
        )


def test_refuses_gpu_evidence_without_the_rims_to_judge_it(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, anchors: GpuAnchors
) -> None:
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))
    with pytest.raises(AttestationRefused, match="--gpu-rims"):
        _verify(
            service,
            platform,
            policy=_gpu_policy(platform, gpu.driver_version),
            rims=None,
            anchors=anchors,
        )


def test_refuses_a_gpu_cc_service_under_reference_values_that_name_no_gpu(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))
    with pytest.raises(AttestationRefused, match="has no gpu section"):
        _verify(service, platform, policy=policy_for(platform), rims=rims, anchors=anchors)


def test_refuses_a_gpu_whose_driver_the_policy_does_not_allow(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))
    with pytest.raises(AttestationRefused, match="GPU 0"):
        _verify(
            service, platform, policy=_gpu_policy(platform, "1.0.0"), rims=rims, anchors=anchors
        )


def test_refuses_a_gpu_under_roots_the_client_does_not_trust(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, tmp_path: Path
) -> None:
    stranger = SyntheticGpu(NOW)
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))
    with pytest.raises(AttestationRefused, match="GPU 0"):
        _verify(
            service,
            platform,
            policy=_gpu_policy(platform, gpu.driver_version),
            rims=rims,
            anchors=stranger.anchors(environ=SIMULATED),
        )


def test_a_gpu_cc_receipt_verifies_only_with_the_gpus_checked(
    platform: SimulatedTdxPlatform, gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    """A receipt of a gpu-cc answer stands on the receipt attestation, GPUs included."""
    service = SimulatedService(platform, claims=GPU_CC, gpus=(gpu,))
    document = service.answer(RECEIPTS_NONCE, collateral=platform.collateral_json())
    receipt = receipt_fields(document, body_sha256(BODY))
    answer = BODY | {RECEIPT_FIELD: sign_receipt(receipt, service.signing_key)}
    options: dict[str, Any] = {
        "anchor": anchor_for(platform.root_der, SIMULATED),
        "now": RECEIPT_TIME,
        "policy": _gpu_policy(platform, gpu.driver_version),
    }
    verified = verify_receipt(
        receipt_of(answer), document, **options, gpu_rims=rims, gpu_anchors=anchors
    )
    assert verified.attested.gpus and verified.attested.profile == "gpu-cc"
    with pytest.raises(ReceiptRefused, match="--gpu-rims"):
        verify_receipt(receipt_of(answer), document, **options, gpu_anchors=anchors)
