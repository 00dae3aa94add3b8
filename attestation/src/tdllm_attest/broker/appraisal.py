"""Appraise one attest request against its session and the key's policy; return the claims.

Every refusal is a `BrokerProblem` whose `reason` is the full story (for the audit log).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from tdllm_attest.binding import check_report_data
from tdllm_attest.broker.keystore import KeyRecord
from tdllm_attest.broker.problems import CollateralUnavailable, EvidenceRejected, PolicyRefused
from tdllm_attest.broker.protocol import (
    GPU_EVIDENCE_KEY,
    OPTIONAL_RUNTIME_DATA_KEYS,
    PROTOCOL,
    RUNTIME_DATA_KEYS,
    report_data_for,
)
from tdllm_attest.broker.sessions import Session
from tdllm_attest.broker.settings import BrokerSettings
from tdllm_attest.broker.wrapping import tee_public_key
from tdllm_attest.collateral import Collateral, collateral_from_json
from tdllm_attest.errors import (
    AttestationError,
    CollateralError,
    EventLogError,
    GpuPolicyError,
    PolicyMismatch,
    TcbStatusError,
)
from tdllm_attest.eventlog import Event, parse_ccel_log, parse_ccel_table, parse_runtime_log
from tdllm_attest.gpu.binding import gpu_nonce
from tdllm_attest.gpu.evidence import GpuEvidence, evidence_digest
from tdllm_attest.gpu.policy import GpuAppraisal, appraise_gpu
from tdllm_attest.policy import check_model_release, check_tcb, validate
from tdllm_attest.policy_format import Policy
from tdllm_attest.trust import MODE_PRODUCTION, MODE_SIMULATED
from tdllm_attest.verify import VerifiedQuote, verify_quote
from tdllm_attest.wire import from_b64url

MAX_GPUS = 16  # GPUs in one TD's evidence (an HGX board has 8)


@dataclass(frozen=True)
class Appraisal:
    """What was verified: for the release response and the audit log."""

    verified: VerifiedQuote
    tee_pubkey: Any
    tee_jwk: dict[str, str]  # the same key as sent (the broker's answer signature covers it)
    mode: str
    gpus: tuple[GpuAppraisal, ...] = ()  # the gpu-cc profile's GPUs, as appraised
    policy: Policy | None = None  # the key's policy, as applied (its `cluster` section certifies)
    runtime_data: dict[str, Any] | None = None  # as checked and bound by REPORTDATA

    def summary(self) -> dict[str, Any]:
        """Claims returned to the TD with its key (nothing secret)."""
        summary = {
            "tcb_status": self.verified.tcb_status,
            "simulated": self.verified.simulated,
            "mode": self.mode,
            "quote_sha256": hashlib.sha256(self.verified.quote.raw).hexdigest(),
        }
        if self.gpus:
            summary["gpus"] = [gpu.summary() for gpu in self.gpus]
        return summary


def _check_runtime_data(runtime: object, session: Session) -> dict[str, Any]:
    if (
        not isinstance(runtime, dict)
        or set(runtime) - OPTIONAL_RUNTIME_DATA_KEYS != RUNTIME_DATA_KEYS
    ):
        raise EvidenceRejected("runtime_data is not an object with exactly the protocol keys")
    for name, want in (
        ("protocol", PROTOCOL),
        ("session_id", session.session_id),
        ("nonce", session.nonce),
        ("key_id", session.key_id),
    ):
        if runtime[name] != want:
            raise EvidenceRejected(f"runtime_data.{name} does not match the session")
    return runtime


def _collateral(request_collateral: object, settings: BrokerSettings, raw: bytes) -> Collateral:
    """The broker's own collateral; the request's only under the insecure dev switch.

    A failing source is a refusal (the TD retries later), never a reason to use the request's.
    """
    try:
        if settings.collateral is not None:
            return settings.collateral.get(raw)
        if settings.accept_request_collateral_insecure and isinstance(request_collateral, str):
            return collateral_from_json(request_collateral)
    except AttestationError as exc:
        raise CollateralUnavailable(f"collateral: {exc}") from None
    raise CollateralUnavailable(
        "no collateral: the broker has no collateral source configured"
        + ("" if settings.accept_request_collateral_insecure else " (request collateral ignored)")
    )


@dataclass(frozen=True)
class EventLogs:
    """Optional event-log evidence from the attest request (parsed; replayed by the policy)."""

    ccel: list[Event] | None = None
    runtime: list[Event] | None = None


def parse_event_logs(ccel: object, runtime_log: object) -> EventLogs:
    """`ccel` = {"table": b64url, "data": b64url}; `runtime_log` = the RTMR3 log's JSON text."""
    try:
        ccel_events = None
        if ccel is not None:
            if not isinstance(ccel, dict) or set(ccel) != {"table", "data"}:
                raise EvidenceRejected("ccel is not an object with exactly 'table' and 'data'")
            parse_ccel_table(from_b64url(ccel["table"]))
            ccel_events = parse_ccel_log(from_b64url(ccel["data"]))
        runtime_events = None
        if runtime_log is not None:
            if not isinstance(runtime_log, str):
                raise EvidenceRejected("runtime_log is not JSON text")
            runtime_events = parse_runtime_log(runtime_log)
    except (EventLogError, ValueError) as exc:
        raise EvidenceRejected(f"event log: {exc}") from None
    return EventLogs(ccel_events, runtime_events)


def parse_gpu_evidence(value: object) -> tuple[GpuEvidence, ...] | None:
    """The attest request's `gpu_evidence` (a list of evidence objects), or None if absent."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > MAX_GPUS:
        raise EvidenceRejected(f"gpu_evidence is not a list of 1..{MAX_GPUS} evidence objects")
    try:
        return tuple(GpuEvidence.from_json(item) for item in value)
    except AttestationError as exc:
        raise EvidenceRejected(f"gpu_evidence: {exc}") from None


def _bound_gpu_evidence(
    runtime: dict[str, Any], evidences: tuple[GpuEvidence, ...] | None
) -> tuple[GpuEvidence, ...] | None:
    """The request's GPU evidence if REPORTDATA binds exactly it; evidence with no binding, or
    a binding with no evidence, is refused (the host adds, strips or swaps it)."""
    bound = runtime.get(GPU_EVIDENCE_KEY)
    if evidences is None and bound is None:
        return None
    if evidences is None or bound is None:
        raise EvidenceRejected("gpu_evidence and runtime_data.gpu_evidence_sha256 come together")
    if not hmac.compare_digest(str(bound), evidence_digest(evidences)):
        raise EvidenceRejected("gpu_evidence is not the evidence runtime_data binds")
    return evidences


def _appraise_gpus(
    evidences: tuple[GpuEvidence, ...] | None,
    policy: Policy,
    session: Session,
    settings: BrokerSettings,
) -> tuple[GpuAppraisal, ...]:
    """The policy's GPU rules on the bound evidence (gpu-cc); nothing when it has none."""
    if policy.gpu is None:
        return ()
    if evidences is None:
        raise PolicyRefused(f"policy {policy.name!r} requires GPU evidence; the request has none")
    if settings.gpu_rims is None or settings.gpu_anchors is None:
        raise CollateralUnavailable("the broker has no GPU reference values (RIMs) configured")
    try:
        appraised = appraise_gpu(
            evidences,
            nonce=gpu_nonce(from_b64url(session.nonce)),
            rims=settings.gpu_rims,
            policy=policy.gpu,
            anchors=settings.gpu_anchors,
            now=settings.now(),
        )
    except (PolicyMismatch, GpuPolicyError) as exc:
        raise PolicyRefused(f"policy {policy.name!r}: GPU: {exc}") from None
    except AttestationError as exc:
        raise EvidenceRejected(f"GPU evidence: {type(exc).__name__}: {exc}") from None
    return tuple(appraised)


def appraise(
    *,
    session: Session,
    record: KeyRecord,
    runtime: object,
    raw_quote: bytes,
    request_collateral: object,
    settings: BrokerSettings,
    event_logs: EventLogs | None = None,
    gpu_evidence: tuple[GpuEvidence, ...] | None = None,
) -> Appraisal:
    """Session binding, quote verification, REPORTDATA, release mode, TCB, TD policy, and
    whether the policy lets the record's model and version go out.

    `event_logs` (CCEL, runtime RTMR3 log) are replayed against the quote's RTMRs by the policy;
    a policy with ``rtmr3: "event_log"`` refuses a request that carries no runtime log.
    `gpu_evidence` (parse_gpu_evidence) must be what runtime_data binds; a policy with a `gpu`
    section refuses a request without it, and appraises it after the TD checks.
    """
    logs = event_logs or EventLogs()
    runtime_data = _check_runtime_data(runtime, session)
    gpus_sent = _bound_gpu_evidence(runtime_data, gpu_evidence)
    try:
        pubkey = tee_public_key(runtime_data["tee_pubkey"])
    except ValueError as exc:
        raise EvidenceRejected(str(exc)) from None
    policy = settings.policies.get(record.policy)
    if policy is None:
        raise PolicyRefused(f"key {record.key_id!r} names unknown policy {record.policy!r}")
    collateral = _collateral(request_collateral, settings, raw_quote)
    try:
        verified = verify_quote(
            raw_quote,
            collateral,
            now=settings.now(),
            anchor=settings.anchor,
            limits=policy.freshness_limits(),
        )
    except (TcbStatusError, PolicyMismatch) as exc:  # genuine, but refused by TD/TCB rules
        raise PolicyRefused(f"quote verification: {type(exc).__name__}: {exc}") from None
    except CollateralError as exc:  # the broker's own collateral is stale or bad: not the TD's
        raise CollateralUnavailable(f"quote verification: {exc}") from None
    except AttestationError as exc:
        raise EvidenceRejected(f"quote verification: {type(exc).__name__}: {exc}") from None
    try:
        check_report_data(verified, report_data_for(runtime_data))
    except AttestationError as exc:
        raise EvidenceRejected(f"REPORTDATA does not bind runtime_data: {exc}") from None
    mode = MODE_SIMULATED if verified.simulated else MODE_PRODUCTION
    if mode not in record.modes:
        raise PolicyRefused(
            f"key {record.key_id!r} may be released in {sorted(record.modes)}, evidence is {mode}"
        )
    try:
        check_tcb(verified, policy.tcb)
        validate(verified, policy, ccel_events=logs.ccel, runtime_events=logs.runtime)
        # a rollback: the key of an older (flawed, or laxly sealed) version of the model
        check_model_release(policy, record.model, record.version)
    except (TcbStatusError, PolicyMismatch) as exc:
        raise PolicyRefused(f"policy {policy.name!r}: {exc}") from None
    gpus = _appraise_gpus(gpus_sent, policy, session, settings)
    return Appraisal(
        verified=verified,
        tee_pubkey=pubkey,
        tee_jwk=runtime_data["tee_pubkey"],
        mode=mode,
        gpus=gpus,
        policy=policy,
        runtime_data=runtime_data,
    )
