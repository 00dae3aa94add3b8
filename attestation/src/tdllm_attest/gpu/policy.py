"""Is each GPU what we expect? Verified reports judged against NVIDIA's RIMs and a `GpuPolicy`.

`appraise_gpu` runs, for every evidence in order: `verify_evidence` (chain, FWID, signature), the
nonce (constant time), the mode (feature flag) and the allowed versions, then finds the driver and
VBIOS RIMs for the versions the report states, verifies them (`verify_rim`), requires their
versions to equal the report's (no downgrade to an older RIM), and compares every ACTIVE golden
measurement with the report. Across GPUs it refuses a mix of SPT and MPT (as NVIDIA does) and the
same device twice. Any failure raises at once, naming the GPU index and the cause in one line.

Index convention: a RIM's measurement index i describes the report's SPDM block i + 1 (NVIDIA's
verifier reads block i as measurement i - 1).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tdllm_attest.clock import require_aware
from tdllm_attest.errors import GpuEvidenceError, GpuPolicyError
from tdllm_attest.gpu.abi import NONCE_SIZE, NVDEC0_DISABLED
from tdllm_attest.gpu.anchors import GpuAnchors
from tdllm_attest.gpu.evidence import GpuEvidence
from tdllm_attest.gpu.rim import GoldenMeasurement, Rim, RimKind, RimStore, verify_rim
from tdllm_attest.gpu.verify import VerifiedGpuReport, verify_evidence

MAX_GPUS = 64
# NVIDIA skips this (0-based) index when the report says NVDEC0 is disabled: the decoder
# engine's firmware is then not loaded, so its golden value cannot be met.
NVDEC0_MEASUREMENT_INDEX = 35


@dataclass(frozen=True)
class GpuPolicy:
    """What a GPU must be. Empty version sets allow any version the RIM store covers.

    `allowed_feature_flags`: SPT (one GPU per TD) and MPT (several) by default; PPCIE needs the
    NVSwitch attestation we do not do. `require_feature_flag`: refuse Hopper firmware that predates
    the flag (opaque data version 0), which NVIDIA accepts.
    """

    allowed_driver_versions: frozenset[str] = frozenset()
    allowed_vbios_versions: frozenset[str] = frozenset()
    allowed_feature_flags: frozenset[str] = frozenset({"SPT", "MPT"})
    require_feature_flag: bool = False


@dataclass(frozen=True)
class GpuAppraisal:
    """One GPU that passed: its verified report, the RIMs it matched and what was compared."""

    index: int
    verified: VerifiedGpuReport
    driver_rim: Rim
    vbios_rim: Rim
    matched: int
    skipped: tuple[int, ...] = field(default=())

    def summary(self) -> dict[str, Any]:
        """A JSON-able one-GPU record for audit logs."""
        opaque = self.verified.report.opaque
        return {
            "gpu": self.index,
            "arch": self.verified.arch,
            "driver": opaque.driver_version,
            "vbios": opaque.vbios_version,
            "fwid": self.verified.fwid.hex(),
            "feature_flag": opaque.feature_flag,
            "driver_rim": self.driver_rim.rim_id,
            "vbios_rim": self.vbios_rim.rim_id,
            "measurements_matched": self.matched,
            "measurements_skipped": list(self.skipped),
            "simulated": self.verified.simulated,
        }


def _check_mode(verified: VerifiedGpuReport, policy: GpuPolicy) -> None:
    flag = verified.report.opaque.feature_flag
    if flag is None:
        if policy.require_feature_flag:
            raise GpuPolicyError("the report carries no feature flag (SPT/MPT) and one is required")
        return
    if flag not in policy.allowed_feature_flags:
        allowed = ", ".join(sorted(policy.allowed_feature_flags)) or "none"
        raise GpuPolicyError(f"feature flag {flag} is not allowed (allowed: {allowed})")


def _check_versions(verified: VerifiedGpuReport, policy: GpuPolicy) -> None:
    opaque = verified.report.opaque
    for what, version, allowed in (
        ("driver", opaque.driver_version, policy.allowed_driver_versions),
        ("VBIOS", opaque.vbios_version, policy.allowed_vbios_versions),
    ):
        if allowed and version.lower() not in {v.lower() for v in allowed}:
            raise GpuPolicyError(
                f"{what} version {version} is not allowed (allowed: {', '.join(sorted(allowed))})"
            )


def _verified_rim(
    xml: bytes, kind: RimKind, version: str, anchors: GpuAnchors, now: datetime
) -> Rim:
    try:
        rim = verify_rim(xml, root=anchors.rim_root, now=now)
    except GpuEvidenceError as exc:
        raise GpuEvidenceError(f"{kind} RIM: {exc}") from None
    if rim.kind != kind or rim.version != version.lower():
        raise GpuPolicyError(
            f"{kind} RIM {rim.rim_id} is for {rim.kind} {rim.version}, the report states {version}"
        )
    return rim


def _golden(driver: Rim, vbios: Rim) -> dict[int, tuple[str, GoldenMeasurement]]:
    golden: dict[int, tuple[str, GoldenMeasurement]] = {}
    for source, rim in (("driver", driver), ("vbios", vbios)):
        for index, measurement in rim.measurements.items():
            if not measurement.active:
                continue
            if index in golden:  # NVIDIA refuses this too: which RIM would speak for it?
                raise GpuPolicyError(f"driver and VBIOS RIMs both set measurement {index}")
            golden[index] = (source, measurement)
    return golden


def _compare(verified: VerifiedGpuReport, driver: Rim, vbios: Rim) -> tuple[int, tuple[int, ...]]:
    measurements = verified.report.measurements
    described = max(max(driver.measurements), max(vbios.measurements)) + 1
    if described > len(measurements):
        raise GpuPolicyError(
            f"the report has {len(measurements)} measurements, the RIMs describe {described}"
        )
    skip = set()
    if verified.report.opaque.nvdec0_status == NVDEC0_DISABLED:
        skip.add(NVDEC0_MEASUREMENT_INDEX)
    golden = _golden(driver, vbios)
    mismatched = [
        f"{index} ({source})"
        for index, (source, measurement) in sorted(golden.items())
        if index not in skip and measurements[index + 1] not in measurement.alternatives
    ]
    if mismatched:
        raise GpuPolicyError(f"measurements differ from the RIMs at index {', '.join(mismatched)}")
    skipped = tuple(sorted(skip & set(golden)))
    return len(golden) - len(skipped), skipped


def _appraise_one(
    index: int,
    evidence: GpuEvidence,
    *,
    nonce: bytes,
    rims: RimStore,
    policy: GpuPolicy,
    anchors: GpuAnchors,
    now: datetime,
) -> GpuAppraisal:
    verified = verify_evidence(evidence, anchors=anchors, now=now)
    report = verified.report
    if not hmac.compare_digest(report.request_nonce, nonce):
        raise GpuEvidenceError("the report answers another nonce (replay?)")  # not fresh
    _check_mode(verified, policy)
    _check_versions(verified, policy)
    opaque = report.opaque
    driver = _verified_rim(
        rims.driver_rim(opaque.driver_version), "driver", opaque.driver_version, anchors, now
    )
    vbios_xml = rims.vbios_rim(
        opaque.vbios_version,
        project=opaque.project,
        project_sku=opaque.project_sku,
        chip_sku=opaque.chip_sku,
    )
    vbios = _verified_rim(vbios_xml, "vbios", opaque.vbios_version, anchors, now)
    matched, skipped = _compare(verified, driver, vbios)
    return GpuAppraisal(index, verified, driver, vbios, matched, skipped)


def appraise_gpu(
    evidences: Sequence[GpuEvidence],
    *,
    nonce: bytes,
    rims: RimStore,
    policy: GpuPolicy,
    anchors: GpuAnchors,
    now: datetime,
) -> list[GpuAppraisal]:
    """Appraise every GPU; raise `GpuEvidenceError` / `GpuPolicyError` ("GPU i: cause") on the
    first failure. An empty list is refused: a gpu-cc deployment without a GPU is not one."""
    now = require_aware(now)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise GpuPolicyError(f"the GPU nonce must be {NONCE_SIZE} bytes")
    if not evidences:
        raise GpuPolicyError("no GPU evidence: gpu-cc needs at least one attested GPU")
    if len(evidences) > MAX_GPUS:
        raise GpuPolicyError(f"{len(evidences)} GPU evidences, at most {MAX_GPUS}")
    appraisals = []
    for index, evidence in enumerate(evidences):
        try:
            appraisals.append(
                _appraise_one(
                    index,
                    evidence,
                    nonce=nonce,
                    rims=rims,
                    policy=policy,
                    anchors=anchors,
                    now=now,
                )
            )
        except (GpuEvidenceError, GpuPolicyError) as exc:
            raise type(exc)(f"GPU {index}: {exc}") from None
    _check_set(appraisals)
    return appraisals


def _check_set(appraisals: list[GpuAppraisal]) -> None:
    seen: dict[bytes, int] = {}
    for appraisal in appraisals:
        first = seen.setdefault(appraisal.verified.leaf_public_key, appraisal.index)
        if first != appraisal.index:  # one GPU answering twice is not two GPUs
            raise GpuPolicyError(f"GPU {appraisal.index}: the same device as GPU {first}")
    flags = {a.verified.report.opaque.feature_flag for a in appraisals} - {None}
    if {"SPT", "MPT"} <= flags:
        raise GpuPolicyError("GPUs in both SPT and MPT mode: NVIDIA does not allow the mix")
