"""Receipts: every answer signed over what was asked, what was answered, and by which TD.

The service makes one receipt attestation per set of served claims (when the engine is ready,
in practice once per boot): a quote whose REPORTDATA is the ordinary service binding
(`tdllm_attest.client.binding.report_data`) for the fixed receipts nonce, so it binds the
Ed25519 signing key, profile, model identity and reference-values id. It verifies that quote
itself with the collateral it serves (injected, the simulated quote service's, or the PCCS's)
to learn the TCB status, re-checked hourly in the background; without collateral or a trust
anchor the status is "unverified", never a guess. GET /v1/attestation/receipts serves that
document, with collateral fetched at request time, so anyone can check receipts offline
(`tdllm-verify receipt`).

Each successful chat or completion answer then carries a receipt (wire format:
`tdllm_attest.client.receipt_protocol`) signed by that key: a whole answer as a top-level
``tdllm_receipt`` field, a stream in the last event before ``[DONE]``. Errors carry none, and a
service without attestation issues none (nothing could verify them).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Blueprint, current_app, jsonify
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue

from tdllm.api.attestation import (
    attestation_document,
    served_collateral,
    service_claims,
)
from tdllm.api.errors import not_ready
from tdllm.engine import SamplingParams
from tdllm_attest.client.binding import ServiceClaims
from tdllm_attest.client.receipt_protocol import (
    RECEIPT_SCHEMA,
    RECEIPTS_NONCE,
    RECEIPTS_PATH,
    UNVERIFIED,
    decimal,
    format_time,
    sign_receipt,
)
from tdllm_attest.errors import AttestationError

log = logging.getLogger("tdllm.api.receipts")
blueprint = Blueprint("receipts", __name__)
TCB_RECHECK = timedelta(hours=1)  # how stale the TCB status in receipts may get
_EXTENSION = "tdllm.receipts"


@dataclass(frozen=True)
class ReceiptAttestation:
    """The quote receipts are issued under, and what the TD learned by verifying it."""

    document: dict[str, Any]  # the /v1/attestation-shaped answer, collateral null
    quote: bytes
    quote_sha256: str
    claims: ServiceClaims
    tcb_status: str
    checked_at: datetime


class ReceiptAttestations:
    """The current receipt attestation of one app: a new quote when the claims change (made at
    boot, once the engine runs), the TCB status re-checked every `TCB_RECHECK` on a thread of
    its own, so no request waits on collateral. One lock: concurrent callers quote once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: ReceiptAttestation | None = None
        self._rechecking = False

    def current(self, service: Any) -> ReceiptAttestation:
        claims = service_claims(service)
        with self._lock:
            made = self._current
            if made is None or made.claims != claims:
                made = self._current = _make(service, claims)
            stale = service.clock() - made.checked_at > TCB_RECHECK
            if stale and not self._rechecking:
                self._rechecking = True
                threading.Thread(
                    target=self._recheck,
                    args=(service, made),
                    name="tdllm-receipt-tcb",
                    daemon=True,
                ).start()
            return made

    def _recheck(self, service: Any, made: ReceiptAttestation) -> None:
        try:
            status = _tcb_status(service, made.quote)
        finally:
            with self._lock:
                self._rechecking = False
        with self._lock:
            if self._current is made:  # not replaced by a new quote meanwhile
                self._current = replace(made, tcb_status=status, checked_at=service.clock())


def prepare(app: Any) -> None:
    """Make the receipt attestation now (boot calls this when ready), not on a first request."""
    service = app.extensions["tdllm"]
    try:
        app.extensions[_EXTENSION].current(service)
    except Exception as exc:  # the first receipt will try again and answer the 503 itself
        log.warning("receipt attestation not made at boot (%s)", type(exc).__name__)


@blueprint.record_once
def _install(state: BlueprintSetupState) -> None:
    state.app.extensions[_EXTENSION] = ReceiptAttestations()


def _attestations() -> ReceiptAttestations:
    made: ReceiptAttestations = current_app.extensions[_EXTENSION]
    return made


@blueprint.get(RECEIPTS_PATH)
def receipts_attestation() -> ResponseReturnValue:
    """The receipt attestation, as /v1/attestation answers for the receipts nonce."""
    service = current_app.extensions["tdllm"]
    if service.state.quote_provider is not None and not service.state.ready:
        raise not_ready(service.state.not_ready_reason())  # receipts name the running model
    made = _attestations().current(service)  # a 503 without attestation, like /v1/attestation
    body = dict(made.document)
    body["collateral"] = served_collateral(service, made.quote)
    # unsigned conveniences: a verifier recomputes the digest and checks the status itself
    body["quote_sha256"] = made.quote_sha256
    body["tcb_status"] = made.tcb_status
    return jsonify(body)


def _make(service: Any, claims: ServiceClaims) -> ReceiptAttestation:
    document, quote = attestation_document(service, RECEIPTS_NONCE, claims)
    log.info("receipt attestation made (quote sha256 %s)", hashlib.sha256(quote).hexdigest())
    return ReceiptAttestation(
        document,
        quote,
        hashlib.sha256(quote).hexdigest(),
        claims,
        _tcb_status(service, quote),
        service.clock(),
    )


def _tcb_status(service: Any, quote: bytes) -> str:
    """The TCB status of our own quote under the collateral we serve; "unverified" when there
    is no collateral or no trust anchor, or it does not verify (logged)."""
    from tdllm_attest.collateral import collateral_from_json
    from tdllm_attest.verify import verify_quote

    source = service.state.collateral
    try:
        anchor = _trust_anchor(service)
        if source is None or anchor is None:
            return UNVERIFIED
        collateral = collateral_from_json(source(quote))
        verified = verify_quote(quote, collateral, now=service.clock(), anchor=anchor)
    except (AttestationError, ValueError) as exc:
        log.warning("receipts: our own quote does not verify (%s): TCB status unverified", exc)
        return UNVERIFIED
    return verified.tcb_status


def _trust_anchor(service: Any) -> Any:
    """Intel's root; in simulated mode the simulated platform's root when the provider holds
    it (the simulated quote service's root stays on the host: None)."""
    from tdllm_attest.trust import ALLOW_SIMULATED_ENV, TrustAnchor, simulated_trust_anchor

    if not service.state.simulated:
        return TrustAnchor.intel()
    platform = getattr(service.state.quote_provider, "platform", None)
    if platform is None or not service.settings.allow_simulated:
        return None
    environ = {ALLOW_SIMULATED_ENV: "1"}
    return simulated_trust_anchor(platform.root_der, mode="simulated", environ=environ)


@dataclass(frozen=True)
class PendingReceipt:
    """Everything of a receipt but the answer's digest and the time, fixed before generating."""

    attestation: ReceiptAttestation
    signer: Ed25519PrivateKey
    clock: Callable[[], datetime]
    endpoint: str
    stream: bool
    request_sha256: str
    sampling: dict[str, Any]

    def sign(self, response_sha256: str) -> dict[str, Any]:
        """The ``tdllm_receipt`` of the answer whose digest is `response_sha256`."""
        claims = self.attestation.claims
        receipt = {
            "schema": RECEIPT_SCHEMA,
            "time": format_time(self.clock()),
            "endpoint": self.endpoint,
            "stream": self.stream,
            "request_sha256": self.request_sha256,
            "response_sha256": response_sha256,
            "sampling": self.sampling,
            "model": claims.model,
            "profile": claims.profile,
            "reference_values_id": claims.reference_values_id,
            "attestation": {
                "quote_sha256": self.attestation.quote_sha256,
                "tcb_status": self.attestation.tcb_status,
            },
        }
        return sign_receipt(receipt, self.signer)


def pending_receipt(
    endpoint: str, request_body: bytes, sampling: dict[str, Any], stream: bool
) -> PendingReceipt | None:
    """The receipt of the request being served, or None without attestation. Raises the 503 of
    a failed quote before any token is made, never after."""
    service = current_app.extensions["tdllm"]
    if service.state.quote_provider is None:
        return None
    return PendingReceipt(
        _attestations().current(service),
        service.identity.signing_key,
        service.clock,
        endpoint,
        stream,
        hashlib.sha256(request_body).hexdigest(),
        sampling,
    )


def sampling_used(params: SamplingParams) -> dict[str, Any]:
    """The sampling parameters the engine runs with (defaults resolved), as receipts state them."""
    return {
        "max_tokens": params.max_tokens,
        "n": params.n,
        "seed": params.seed,
        "stop": list(params.stop),
        "temperature": decimal(params.temperature),
        "top_k": params.top_k,
        "top_p": decimal(params.top_p),
    }
