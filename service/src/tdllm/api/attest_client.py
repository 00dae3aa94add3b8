"""Client side of /v1/attestation: verify a service's quote and learn its attested key.

A client trusts the service key only after (1) the quote verifies against the trust anchor
with the collateral from the response, (2) the TCB status is acceptable and (3) REPORTDATA
equals the binding of *its own* fresh nonce and the returned key (`identity.report_data`).
The anchor is Intel's root unless the caller passes the simulated test root, which goes
through `tdllm_attest.simulated.select_trust_anchor` (mode "simulated" AND
TDLLM_ALLOW_SIMULATED_TDX=1); a simulated result is flagged, never silently trusted.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tdllm.api.identity import ATTEST_PROTOCOL, report_data
from tdllm.errors import TdllmError
from tdllm_attest.broker.protocol import from_b64url
from tdllm_attest.collateral import collateral_from_json
from tdllm_attest.errors import AttestationError
from tdllm_attest.policy import check_tcb
from tdllm_attest.simulated import select_trust_anchor
from tdllm_attest.trust import TrustAnchor


class AttestationRefused(TdllmError):  # noqa: N818  # reads as the event
    """The service's attestation did not verify; nothing may be sent to it."""

    exit_code = 4


@dataclass(frozen=True)
class AttestedService:
    """What a verified attestation proves: this X25519 key lives in that TD (or a simulation)."""

    public_key: bytes  # raw X25519
    simulated: bool
    tcb_status: str
    mr_td: str
    anchor_sha256: str


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
    doc: Any, nonce: str, anchor: TrustAnchor, *, now: datetime | None = None
) -> AttestedService:
    """Check an /v1/attestation answer for `nonce`; raise `AttestationRefused` on any defect."""
    if not isinstance(doc, dict) or doc.get("protocol") != ATTEST_PROTOCOL:
        raise AttestationRefused("attestation refused: not a tdllm-api-attest/1 document")
    if doc.get("nonce") != nonce:
        raise AttestationRefused("attestation refused: the answer is not for our nonce")
    jwk = doc.get("service_public_key")
    if not (isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "X25519"):
        raise AttestationRefused("attestation refused: no X25519 service key")
    collateral_text = doc.get("collateral")
    if not isinstance(collateral_text, str):
        raise AttestationRefused("attestation refused: the answer carries no collateral")
    from tdllm_attest.verify import verify_quote

    try:
        key = from_b64url(str(jwk.get("x", "")))
        clean_jwk = {"kty": "OKP", "crv": "X25519", "x": str(jwk["x"])}
        verified = verify_quote(
            from_b64url(str(doc.get("quote", ""))),
            collateral_from_json(collateral_text),
            now=now or datetime.now(UTC),
            anchor=anchor,
        )
        check_tcb(verified)
    except AttestationError as exc:
        raise AttestationRefused(f"attestation refused: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise AttestationRefused(f"attestation refused: malformed ({type(exc).__name__})") from None
    if len(key) != 32:
        raise AttestationRefused("attestation refused: the service key is not 32 bytes")
    expected = report_data(nonce, clean_jwk)
    if not hmac.compare_digest(verified.quote.td_report.report_data, expected):
        raise AttestationRefused(
            "attestation refused: REPORTDATA does not bind our nonce and the service key"
        )
    return AttestedService(
        public_key=key,
        simulated=verified.simulated,
        tcb_status=verified.tcb_status,
        mr_td=verified.quote.td_report.mr_td.hex(),
        anchor_sha256=verified.anchor_sha256,
    )
