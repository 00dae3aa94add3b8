"""Client side of /v1/attestation: verify a service's quote, its identity and its claims.

A client trusts the service keys only after (1) the quote verifies against the trust anchor
with collateral: its own when it has a source (a PCCS, a file; the answer's collateral comes
through the host, which may serve a stale copy that hides a TCB recovery), else the answer's,
(2) the TCB status is acceptable to the reference-values policy, (3) the TD is the one the
policy names: MRTD/RTMR0-2 one of its allowed tuples, TD attributes, XFAM and owner fields as
listed, RTMR3 as it says (the runtime event log, when the answer carries one, must replay to
the quote's RTMR3 first), (4) REPORTDATA equals the binding of *its own* fresh nonce, the
returned keys and the returned claims (protection profile, model identity, reference-values id;
`binding.report_data`), (5) in the gpu-cc profile, the GPU evidence served beside the quote is
the evidence REPORTDATA binds, made for our nonce, signed by NVIDIA-rooted GPUs whose
measurements match NVIDIA's signed reference values (RIMs the caller has) and the policy's
`gpu` rules. Without a policy it refuses: a genuine quote only says "some TD", and a
host can boot its own, prompt-logging image on genuine TDX hardware. Only an explicit
`insecure_any_td=True` skips (3), never the baseline TD checks (DEBUG off etc.), and the result
says so.
The anchor is Intel's root unless the caller passes the simulated test root, which goes
through `tdllm_attest.trust.select_trust_anchor` (mode "simulated" AND
TDLLM_ALLOW_SIMULATED_TDX=1); a simulated result is flagged, never silently trusted.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tdllm_attest.client.binding import ATTEST_PROTOCOL, ServiceClaims, okp_jwk, report_data
from tdllm_attest.client.e2e_protocol import E2E_PROFILES
from tdllm_attest.client.errors import AttestationRefused
from tdllm_attest.collateral import Collateral, CollateralSource, collateral_from_json
from tdllm_attest.errors import AttestationError, BindingError
from tdllm_attest.eventlog import Event, parse_runtime_log, replay
from tdllm_attest.gpu.anchors import GpuAnchors, nvidia_anchors
from tdllm_attest.gpu.binding import gpu_nonce
from tdllm_attest.gpu.evidence import GpuEvidence, evidence_digest
from tdllm_attest.gpu.policy import GpuPolicy, appraise_gpu
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.policy import check_tcb, check_td_baseline, validate
from tdllm_attest.policy_format import Policy, load_policy, load_public_key
from tdllm_attest.trust import TrustAnchor, select_trust_anchor
from tdllm_attest.verify import VerifiedQuote
from tdllm_attest.wire import from_b64url

GPU_CC_PROFILE = "gpu-cc"
NO_POLICY = (
    "no reference-values policy: give --policy FILE --policy-key PUB.pem "
    "(or, to skip checking which TD answers, --insecure-any-td)"
)
NO_COLLATERAL = (
    "the service served no collateral: verify with your own, --pccs URL (a PCCS or Intel PCS) "
    "or --collateral FILE"
)


@dataclass(frozen=True)
class AttestedService:
    """What a verified attestation proves: these keys live in that TD (or a simulation), which
    claims these things about itself."""

    public_key: bytes  # raw X25519: requests are encrypted to it
    signing_key: bytes  # raw Ed25519: every end-to-end answer is signed by it
    simulated: bool
    tcb_status: str
    mr_td: str
    anchor_sha256: str
    rtmr3: str = ""
    # the replayed runtime events (RTMR3), or None when the service sent no log
    runtime_events: tuple[Event, ...] | None = None
    reference_values_id: str | None = None
    profile: str = ""  # the protection profile REPORTDATA binds
    model: Mapping[str, Any] | None = None  # the served model's identity REPORTDATA binds
    policy_name: str | None = None  # the reference values checked; None: any TD was accepted
    gpus: tuple[dict[str, Any], ...] = ()  # gpu-cc: each GPU's appraisal summary


def new_nonce() -> str:
    return secrets.token_hex(32)


def anchor_for(simulated_root_der: bytes | None, environ: Mapping[str, str]) -> TrustAnchor:
    """Intel's root, or the simulated test root through its two-switch gate."""
    mode = "production" if simulated_root_der is None else "simulated"
    try:
        return select_trust_anchor(mode, simulated_root_der=simulated_root_der, environ=environ)
    except AttestationError as exc:
        raise AttestationRefused(str(exc)) from None


def load_reference_policy(policy_file: Path, key_file: Path) -> Policy:
    """The signed `tdllm-attest-policy/1` in `policy_file`, verified with the PEM `key_file`."""
    try:
        key = load_public_key(key_file.read_bytes())
        return load_policy(policy_file.read_text(encoding="utf-8"), key)
    except OSError as exc:
        raise AttestationRefused(f"cannot read the policy: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AttestationRefused("the policy file is not UTF-8 text") from None
    except AttestationError as exc:
        raise AttestationRefused(f"policy refused: {exc}") from exc


def verify_attestation(
    doc: Any,
    nonce: str,
    anchor: TrustAnchor,
    *,
    now: datetime,
    policy: Policy | None,
    insecure_any_td: bool = False,
    collateral_source: CollateralSource | None = None,
    gpu_rims: RimStore | None = None,
    gpu_anchors: GpuAnchors | None = None,
) -> AttestedService:
    """Check an /v1/attestation answer for `nonce` at time `now` (injected: the caller's clock)
    against the reference values `policy`; raise `AttestationRefused` on any defect.

    `policy=None` is refused unless `insecure_any_td` says, explicitly, that any TD will do.
    With a `collateral_source` (e.g. `tdllm_attest.pccs.PccsCollateralSource`) the quote is
    verified against its collateral and whatever the answer carries is ignored; without one the
    answer's is used, and an answer without collateral is refused.
    A gpu-cc answer needs `gpu_rims` (NVIDIA's reference integrity manifests for the GPU's
    driver and VBIOS) and, with a policy, the policy's `gpu` section; `gpu_anchors` defaults to
    NVIDIA's pinned roots (the simulated test roots come only through their two-switch gate).
    """
    if policy is None and not insecure_any_td:
        raise AttestationRefused(f"attestation refused: {NO_POLICY}")
    if not isinstance(doc, dict) or doc.get("protocol") != ATTEST_PROTOCOL:
        raise AttestationRefused(f"attestation refused: not a {ATTEST_PROTOCOL} document")
    if doc.get("nonce") != nonce:
        raise AttestationRefused("attestation refused: the answer is not for our nonce")
    key = _okp_key(doc.get("service_public_key"), "X25519", "service key")
    signing_key = _okp_key(doc.get("signing_public_key"), "Ed25519", "signing key")
    claims = _claims(doc)
    expected = _expected_report_data(nonce, key, signing_key, claims)
    raw_quote = _quote_bytes(doc)
    collateral = _collateral(doc, raw_quote, collateral_source)
    verified = _verified_quote(raw_quote, collateral, anchor, now, policy)
    report = verified.quote.td_report
    if not hmac.compare_digest(report.report_data, expected):
        raise AttestationRefused(
            "attestation refused: REPORTDATA does not bind our nonce, the service keys and "
            "the served profile, model and reference-values id"
        ) from BindingError("REPORTDATA does not bind the expected values")
    events = _replay_runtime_log(doc.get("event_log"), report.rtmr[3])
    _check_identity(verified, policy, events)
    gpus = _check_gpus(doc, nonce, claims, policy, gpu_rims, gpu_anchors, now)
    return AttestedService(
        public_key=key,
        signing_key=signing_key,
        simulated=verified.simulated,
        tcb_status=verified.tcb_status,
        mr_td=report.mr_td.hex(),
        anchor_sha256=verified.anchor_sha256,
        rtmr3=report.rtmr[3].hex(),
        runtime_events=events,
        reference_values_id=claims.reference_values_id,
        profile=claims.profile,
        model=claims.model,
        policy_name=policy.name if policy is not None else None,
        gpus=gpus,
    )


def _check_gpus(
    doc: dict[str, Any],
    nonce: str,
    claims: ServiceClaims,
    policy: Policy | None,
    rims: RimStore | None,
    anchors: GpuAnchors | None,
    now: datetime,
) -> tuple[dict[str, Any], ...]:
    """The bound GPU evidence, appraised; required in the gpu-cc profile (whose prompts go to
    the GPU), checked whenever REPORTDATA binds some."""
    if claims.gpu is None:
        if claims.profile == GPU_CC_PROFILE:
            raise AttestationRefused("attestation refused: a gpu-cc service served no GPU evidence")
        return ()
    items = doc.get("gpu_evidence")
    if not isinstance(items, list) or not items:
        raise AttestationRefused("attestation refused: gpu_evidence is not a list of evidence")
    try:
        evidences = [GpuEvidence.from_json(item) for item in items]
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: gpu_evidence: {exc}") from exc
    if not hmac.compare_digest(evidence_digest(evidences), claims.gpu["evidence_sha256"]):
        raise AttestationRefused(
            "attestation refused: the GPU evidence is not the evidence REPORTDATA binds"
        )
    if policy is not None and policy.gpu is None:
        raise AttestationRefused(
            f"attestation refused: policy {policy.name!r} has no gpu section, so nothing says "
            "which GPU drivers and VBIOS this service may run"
        )
    if rims is None:
        raise AttestationRefused(
            "attestation refused: the service attests GPUs; give NVIDIA's reference integrity "
            "manifests for them (--gpu-rims DIR)"
        )
    try:
        appraised = appraise_gpu(
            evidences,
            nonce=gpu_nonce(bytes.fromhex(nonce)),
            rims=rims,
            policy=policy.gpu if policy is not None and policy.gpu is not None else GpuPolicy(),
            anchors=anchors or nvidia_anchors(),
            now=now,
        )
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: GPU: {exc}") from exc
    return tuple(gpu.summary() for gpu in appraised)


def require_e2e_profile(attested: AttestedService) -> None:
    """Refuse end-to-end encryption to a service whose profile shows prompts to its device."""
    if attested.profile not in E2E_PROFILES:
        raise AttestationRefused(
            f"end-to-end encryption refused: the service's protection profile "
            f"{attested.profile!r} shows prompts to its untrusted device (only "
            f"{', '.join(sorted(E2E_PROFILES))} keep them in the trust boundary)"
        )


def _quote_bytes(doc: dict[str, Any]) -> bytes:
    try:
        return from_b64url(str(doc.get("quote", "")))
    except ValueError:
        raise AttestationRefused("attestation refused: malformed (ValueError)") from None


def _collateral(
    doc: dict[str, Any], raw_quote: bytes, source: CollateralSource | None
) -> Collateral:
    """Our own collateral when we have a source (the answer's is then never read), else the
    answer's; an outage of our source refuses, it never falls back to the host's copy."""
    served = doc.get("collateral")
    if source is None and not isinstance(served, str):
        raise AttestationRefused(f"attestation refused: {NO_COLLATERAL}")
    try:
        return source.get(raw_quote) if source is not None else collateral_from_json(str(served))
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: {exc}") from exc


def _expected_report_data(
    nonce: str, key: bytes, signing_key: bytes, claims: ServiceClaims
) -> bytes:
    try:
        return report_data(nonce, okp_jwk("X25519", key), okp_jwk("Ed25519", signing_key), claims)
    except ValueError:  # NaN or an infinity in the claims: no canonical form, nothing to bind
        raise AttestationRefused("attestation refused: the claims are not canonical JSON") from None


def _verified_quote(
    raw_quote: bytes,
    collateral: Collateral,
    anchor: TrustAnchor,
    now: datetime,
    policy: Policy | None,
) -> VerifiedQuote:
    """The quote, verified with the policy's collateral limits and judged by its TCB rules."""
    from tdllm_attest.verify import verify_quote

    try:
        verified = verify_quote(
            raw_quote,
            collateral,
            now=now,
            anchor=anchor,
            limits=policy.freshness_limits() if policy is not None else None,
        )
        check_tcb(verified, policy.tcb if policy is not None else None)
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: {exc}") from exc
    except (ValueError, KeyError) as exc:
        raise AttestationRefused(f"attestation refused: malformed ({type(exc).__name__})") from None
    return verified


def _check_identity(
    verified: VerifiedQuote, policy: Policy | None, events: tuple[Event, ...] | None
) -> None:
    """Is this the TD the reference values name? Without a policy only the baseline (no DEBUG
    TD, SEPT_VE_DISABLE, Intel module) can be checked."""
    try:
        if policy is None:
            check_td_baseline(verified)
        else:
            runtime = list(events) if events is not None else None
            validate(verified, policy, runtime_events=runtime)
    except AttestationError as exc:
        what = "not the TD" if policy is None else f"not the TD of policy {policy.name!r}"
        raise AttestationRefused(f"attestation refused: {what}: {exc}") from exc


def _claims(doc: dict[str, Any]) -> ServiceClaims:
    """The served profile, model and reference-values id, type-checked (REPORTDATA binds them)."""
    profile = doc.get("profile")
    if not isinstance(profile, str):
        raise AttestationRefused("attestation refused: the answer names no protection profile")
    model = doc.get("model")
    if model is not None and not isinstance(model, dict):
        raise AttestationRefused("attestation refused: model is not an object")
    reference_values_id = doc.get("reference_values_id")
    if reference_values_id is not None and not isinstance(reference_values_id, str):
        raise AttestationRefused("attestation refused: reference_values_id is not a string")
    gpu = doc.get("gpu")
    if gpu is not None and not (
        isinstance(gpu, dict)
        and set(gpu) == {"evidence_sha256"}
        and isinstance(gpu["evidence_sha256"], str)
    ):
        raise AttestationRefused("attestation refused: gpu is not {evidence_sha256}")
    return ServiceClaims(profile, model, reference_values_id, gpu)


def _okp_key(jwk: Any, crv: str, what: str) -> bytes:
    """The raw 32-byte key of an OKP JWK on `crv`; anything else is refused."""
    if not (isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == crv):
        raise AttestationRefused(f"attestation refused: no {crv} {what}")
    try:
        raw = from_b64url(str(jwk.get("x", "")))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise AttestationRefused(f"attestation refused: the {what} is not 32 bytes")
    return raw


def _replay_runtime_log(event_log: Any, rtmr3: bytes) -> tuple[Event, ...] | None:
    """Parse the runtime log and check it replays to the quote's RTMR3 (fail closed)."""
    if event_log is None:
        return None
    if not isinstance(event_log, str):
        raise AttestationRefused("attestation refused: event_log is not the runtime log's text")
    try:
        events = parse_runtime_log(event_log)
        replayed = replay(events)[3]
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: event log: {exc}") from exc
    if not hmac.compare_digest(replayed, rtmr3):
        raise AttestationRefused(
            "attestation refused: the runtime event log does not replay to the quote's RTMR3"
        )
    return tuple(events)
