"""Client side of /v1/attestation: verify a service's quote and learn its attested key.

A client trusts the service keys only after (1) the quote verifies against the trust anchor
with the collateral from the response, (2) the TCB status is acceptable, (3) REPORTDATA
equals the binding of *its own* fresh nonce and the returned keys (`identity.report_data`) and
(4) the runtime event log, when the answer carries one, replays to the quote's RTMR3.
The anchor is Intel's root unless the caller passes the simulated test root, which goes
through `tdllm_attest.simulated.select_trust_anchor` (mode "simulated" AND
TDLLM_ALLOW_SIMULATED_TDX=1); a simulated result is flagged, never silently trusted.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tdllm.api.identity import ATTEST_PROTOCOL, okp_jwk, report_data
from tdllm.errors import TdllmError
from tdllm_attest.broker.protocol import from_b64url
from tdllm_attest.collateral import collateral_from_json
from tdllm_attest.errors import AttestationError
from tdllm_attest.eventlog import Event, parse_runtime_log, replay
from tdllm_attest.policy import check_tcb
from tdllm_attest.simulated import select_trust_anchor
from tdllm_attest.trust import TrustAnchor


class AttestationRefused(TdllmError):  # noqa: N818  # reads as the event
    """The service's attestation did not verify; nothing may be sent to it."""

    exit_code = 4


@dataclass(frozen=True)
class AttestedService:
    """What a verified attestation proves: these keys live in that TD (or a simulation)."""

    public_key: bytes  # raw X25519: requests are encrypted to it
    signing_key: bytes  # raw Ed25519: every end-to-end answer is signed by it
    simulated: bool
    tcb_status: str
    mr_td: str
    anchor_sha256: str
    rtmr3: str = ""
    # the replayed runtime events (RTMR3), or None when the service sent no log; judging them
    # is the caller's policy (tdllm-verify --policy), replaying them is ours
    runtime_events: tuple[Event, ...] | None = None
    reference_values_id: str | None = None


def new_nonce() -> str:
    return secrets.token_hex(32)


def anchor_for(simulated_root_der: bytes | None, environ: Mapping[str, str]) -> TrustAnchor:
    """Intel's root, or the simulated test root through its two-switch gate."""
    mode = "production" if simulated_root_der is None else "simulated"
    try:
        return select_trust_anchor(mode, simulated_root_der=simulated_root_der, environ=environ)
    except AttestationError as exc:
        raise AttestationRefused(str(exc)) from None


def verify_attestation(
    doc: Any, nonce: str, anchor: TrustAnchor, *, now: datetime
) -> AttestedService:
    """Check an /v1/attestation answer for `nonce` at time `now` (injected: the caller's clock);
    raise `AttestationRefused` on any defect."""
    if not isinstance(doc, dict) or doc.get("protocol") != ATTEST_PROTOCOL:
        raise AttestationRefused(f"attestation refused: not a {ATTEST_PROTOCOL} document")
    if doc.get("nonce") != nonce:
        raise AttestationRefused("attestation refused: the answer is not for our nonce")
    key = _okp_key(doc.get("service_public_key"), "X25519", "service key")
    signing_key = _okp_key(doc.get("signing_public_key"), "Ed25519", "signing key")
    collateral_text = doc.get("collateral")
    if not isinstance(collateral_text, str):
        raise AttestationRefused("attestation refused: the answer carries no collateral")
    reference_values_id = doc.get("reference_values_id")
    if reference_values_id is not None and not isinstance(reference_values_id, str):
        raise AttestationRefused("attestation refused: reference_values_id is not a string")
    from tdllm_attest.verify import verify_quote

    try:
        verified = verify_quote(
            from_b64url(str(doc.get("quote", ""))),
            collateral_from_json(collateral_text),
            now=now,
            anchor=anchor,
        )
        check_tcb(verified)
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise AttestationRefused(f"attestation refused: malformed ({type(exc).__name__})") from None
    report = verified.quote.td_report
    expected = report_data(nonce, okp_jwk("X25519", key), okp_jwk("Ed25519", signing_key))
    if not hmac.compare_digest(report.report_data, expected):
        raise AttestationRefused(
            "attestation refused: REPORTDATA does not bind our nonce and the service keys"
        )
    events = _replay_runtime_log(doc.get("event_log"), report.rtmr[3])
    return AttestedService(
        public_key=key,
        signing_key=signing_key,
        simulated=verified.simulated,
        tcb_status=verified.tcb_status,
        mr_td=report.mr_td.hex(),
        anchor_sha256=verified.anchor_sha256,
        rtmr3=report.rtmr[3].hex(),
        runtime_events=events,
        reference_values_id=reference_values_id,
    )


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
        raise AttestationRefused(f"attestation refused: event log: {exc}") from None
    if not hmac.compare_digest(replayed, rtmr3):
        raise AttestationRefused(
            "attestation refused: the runtime event log does not replay to the quote's RTMR3"
        )
    return tuple(events)
