"""GET /v1/attestation?nonce=HEX: a fresh quote binding the client's nonce and the service key.

A client sends a fresh random nonce, verifies the quote offline (`tdllm-verify`), recomputes
REPORTDATA from its nonce and the returned key (`identity.report_data`), and only then trusts
the key. In simulated mode the answer says ``"simulated": true`` and the quote proves nothing.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from tdllm.api.identity import ATTEST_PROTOCOL, report_data
from tdllm.api.openai.errors import ApiError, invalid
from tdllm_attest.broker.protocol import b64url

log = logging.getLogger("tdllm.api.attestation")
blueprint = Blueprint("attestation", __name__)
_NONCE = re.compile(r"(?:[0-9a-fA-F]{2}){16,64}")  # 16..64 bytes
_quote_lock = threading.Lock()  # configfs-tsm has one report entry per request anyway


@blueprint.get("/v1/attestation")
def attestation() -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    nonce = request.args.get("nonce", "")
    if not _NONCE.fullmatch(nonce):
        raise invalid("nonce must be 16 to 64 bytes of hex", "nonce")
    provider = service.state.quote_provider
    if provider is None:
        raise ApiError(
            503,
            "this service runs without attestation (attestation = 'none'): nothing to prove",
            "service_unavailable",
            None,
            "attestation_unavailable",
        )
    nonce = nonce.lower()
    public_jwk = service.identity.public_jwk
    data = report_data(nonce, public_jwk)
    try:
        with _quote_lock:
            quote = provider.get_quote(data)
    except Exception as exc:  # the TD's quote path failed: an outage, not a client mistake
        service.metrics.attestations.labels("failed").inc()
        log.error("quote generation failed (%s)", type(exc).__name__)
        raise ApiError(
            503, "cannot produce a quote now", "service_unavailable", None, "quote_failed"
        ) from None
    service.metrics.attestations.labels("ok").inc()
    collateral = getattr(service.boot_deps, "collateral", None)
    body: dict[str, Any] = {
        "protocol": ATTEST_PROTOCOL,
        "nonce": nonce,
        "service_public_key": public_jwk,
        "report_data": data.hex(),
        "quote": b64url(quote),
        "collateral": collateral(quote) if collateral is not None else None,
        "event_log": None,
        "reference_values_id": None,
        "simulated": service.state.simulated,
    }
    if service.state.simulated:
        body["warning"] = "SIMULATED TDX: this quote proves nothing about the service"
    return jsonify(body)
