"""GET /v1/attestation?nonce=HEX: a fresh quote binding the client's nonce, the service keys and
what the service claims (protection profile, model identity, reference-values id).

A client sends a fresh random nonce, verifies the quote (`tdllm-verify`, or
`tdllm_attest.client.attest`) against the signed reference values, recomputes REPORTDATA from
its nonce and the returned keys and claims (`tdllm_attest.client.binding.report_data`), replays
the runtime event log (when there is one) into RTMR3, and only then trusts the keys and the
claims. In simulated mode the answer says
``"simulated": true`` and the quote proves nothing.

In the gpu-cc profile the GPUs' evidence is collected for this nonce first (over
`tdllm_attest.gpu.binding.gpu_nonce(nonce)`), served as `gpu_evidence`, and its digest is bound
into REPORTDATA with the other claims, so the client checks the GPUs with the same freshness.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from tdllm.api.errors import ApiError, invalid
from tdllm_attest.client.binding import ServiceClaims, attestation_answer, report_data
from tdllm_attest.errors import AttestationError, EventLogError
from tdllm_attest.eventlog import parse_runtime_log
from tdllm_attest.gpu.binding import gpu_nonce
from tdllm_attest.gpu.evidence import GpuEvidence, evidence_digest

log = logging.getLogger("tdllm.api.attestation")
blueprint = Blueprint("attestation", __name__)
_NONCE = re.compile(r"(?:[0-9a-fA-F]{2}){16,64}")  # 16..64 bytes
_quote_lock = threading.Lock()  # configfs-tsm has one report entry per request anyway
_LOG_ATTEMPTS = 3  # an extend racing our quote changes the log; re-read a bounded number of times
MAX_LOG_BYTES = 4 << 20


def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, "service_unavailable", None, code)


@blueprint.get("/v1/attestation")
def attestation() -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    nonce = request.args.get("nonce", "")
    if not _NONCE.fullmatch(nonce):
        raise invalid("nonce must be 16 to 64 bytes of hex", "nonce")
    body, quote = attestation_document(service, nonce.lower(), service_claims(service))
    body["collateral"] = served_collateral(service, quote)
    return jsonify(body)


def collect_gpu_evidence(service: Any, nonce: str) -> list[GpuEvidence] | None:
    """The GPUs' evidence for this nonce (gpu-cc), None without GPUs; a failure is a 503."""
    source = service.state.gpu_evidence
    if source is None:
        return None
    try:
        return list(source(gpu_nonce(bytes.fromhex(nonce))))
    except AttestationError as exc:
        service.metrics.attestations.labels("failed").inc()
        log.error("GPU evidence unavailable: %s", exc)
        raise _unavailable("cannot produce GPU evidence now", "gpu_evidence_failed") from None


def attestation_document(
    service: Any, nonce: str, claims: ServiceClaims
) -> tuple[dict[str, Any], bytes]:
    """(the answer for `nonce` and `claims` with collateral still null, its raw quote); a 503
    when there is no attestation or the quote, the runtime log or (gpu-cc) the GPUs' evidence
    cannot be had now. The GPUs' evidence is collected for `nonce` first and its digest joins
    the claims REPORTDATA binds."""
    provider = service.state.quote_provider
    if provider is None:
        raise _unavailable(
            "this service runs without attestation (attestation = 'none'): nothing to prove",
            "attestation_unavailable",
        )
    gpu_evidence = collect_gpu_evidence(service, nonce)
    if gpu_evidence is not None:
        claims = dataclasses.replace(claims, gpu={"evidence_sha256": evidence_digest(gpu_evidence)})
    identity = service.identity
    public_jwk, signing_jwk = identity.public_jwk, identity.signing_jwk
    data = report_data(nonce, public_jwk, signing_jwk, claims)
    log_path = service.settings.runtime_log
    quote, event_log = _quote_with_log(service, provider, data, log_path)
    service.metrics.attestations.labels("ok").inc()
    body = attestation_answer(
        nonce=nonce,
        public_jwk=public_jwk,
        signing_jwk=signing_jwk,
        claims=claims,
        quote=quote,
        collateral=None,
        event_log=event_log,
        simulated=service.state.simulated,
        gpu_evidence=None if gpu_evidence is None else [e.to_json() for e in gpu_evidence],
    )
    return body, quote


def served_collateral(service: Any, quote: bytes) -> str | None:
    """The collateral text for `quote`, or None when none is configured; an outage is a 503."""
    source = service.state.collateral
    if source is None:
        return None
    try:
        text: str = source(quote)
        return text
    except AttestationError as exc:
        service.metrics.attestations.labels("failed").inc()
        log.error("attestation collateral unavailable: %s", exc)
        raise _unavailable(
            "attestation collateral is unavailable (the PCCS); try again", "collateral_unavailable"
        ) from None


def service_claims(service: Any) -> ServiceClaims:
    """What this service says about itself, as REPORTDATA binds it (client/binding.py)."""
    runner = service.state.runner
    model = None
    if runner is not None:  # the served model exists only once the engine runs
        model = {"id": runner.model_name, "sealed": service.state.sealed_model}
    return ServiceClaims(
        profile=service.settings.profile,
        model=model,
        reference_values_id=service.settings.reference_values_id,
    )


def _quote_with_log(
    service: Any, provider: Any, data: bytes, log_path: str | None
) -> tuple[bytes, str | None]:
    """A quote and the runtime log as it was around it (unchanged before and after)."""
    for _ in range(_LOG_ATTEMPTS):
        before = _read_log(service, log_path)
        quote = _quote(service, provider, data)
        after = _read_log(service, log_path)
        if before == after:
            return quote, after
    service.metrics.attestations.labels("failed").inc()
    log.error("the runtime event log kept changing while quoting")
    raise _unavailable("the runtime event log is changing; try again", "event_log_unavailable")


def _quote(service: Any, provider: Any, data: bytes) -> bytes:
    try:
        with _quote_lock:
            quote: bytes = provider.get_quote(data)
            return quote
    except Exception as exc:  # the TD's quote path failed: an outage, not a client mistake
        service.metrics.attestations.labels("failed").inc()
        log.error("quote generation failed (%s)", type(exc).__name__)
        raise _unavailable("cannot produce a quote now", "quote_failed") from None


def _read_log(service: Any, log_path: str | None) -> str | None:
    """The configured runtime log's text, checked to parse; a configured but unusable log is
    an outage (503), never silently omitted, so a client cannot be shown a quote whose RTMR3
    measurements we were told to explain but did not."""
    if log_path is None:
        return None
    try:
        raw = Path(log_path).read_bytes()
        if len(raw) > MAX_LOG_BYTES:
            raise EventLogError(f"over {MAX_LOG_BYTES} bytes")
        text = raw.decode("utf-8")
        parse_runtime_log(text)
    except (OSError, UnicodeDecodeError, EventLogError) as exc:
        service.metrics.attestations.labels("failed").inc()
        log.error("runtime event log unusable (%s)", type(exc).__name__)
        raise _unavailable(
            "the runtime event log is unavailable", "event_log_unavailable"
        ) from None
    return text
