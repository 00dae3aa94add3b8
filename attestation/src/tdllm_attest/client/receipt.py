"""Offline check of a tdllm-receipt/1 (`receipt_protocol`) against its receipt attestation.

`verify_receipt` trusts nothing in the receipt until the attestation document it names has
verified like any /v1/attestation answer (`verify_attestation`: quote, TCB, reference values,
REPORTDATA binding the signing key and the claims), for the fixed receipts nonce. Then the
receipt must name that document's quote, carry a signature by the key the quote binds, claim
exactly the model, profile and reference-values id the quote binds, and a TCB status the
verifier reproduces (or "unverified"); given the request bytes or the answer the user kept, it
must cover those too.

What that proves: the TD measured as the policy says (one boot of it: the key is ephemeral)
produced this answer to these request bytes with these sampling parameters, at a time its own
clock stated. It does not prove the answer is correct, that the TD's clock was right, or that
the TD answered nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tdllm_attest import errors
from tdllm_attest.client.attest import AttestedService, verify_attestation
from tdllm_attest.client.receipt_protocol import (
    RECEIPT_SCHEMA,
    RECEIPTS_NONCE,
    UNVERIFIED,
    parse_time,
    response_sha256,
    signed_bytes,
)
from tdllm_attest.collateral import CollateralSource
from tdllm_attest.errors import AttestationError
from tdllm_attest.gpu.anchors import GpuAnchors
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.policy_format import Policy
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import VerificationProgress
from tdllm_attest.wire import from_b64url

CLOCK_SKEW = timedelta(minutes=5)  # a receipt may be dated this far after the verification time
_FIELDS = {
    "schema",
    "time",
    "endpoint",
    "stream",
    "request_sha256",
    "response_sha256",
    "sampling",
    "model",
    "profile",
    "reference_values_id",
    "attestation",
}
_HEX64 = frozenset("0123456789abcdef")


class ReceiptRefused(AttestationError):  # noqa: N818  # reads as the event
    """The receipt does not verify; `exit_code` is the failure class (tdllm-verify's table)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt whose every check passed, and what it was checked against."""

    receipt: dict[str, Any]
    time: datetime  # the TD's clock when it signed
    attested: AttestedService  # the verified receipt attestation (keys, TCB, TD, claims)
    request_checked: bool  # the caller's request bytes matched request_sha256
    response_checked: bool  # the caller's answer matched response_sha256


def verify_receipt(
    receipt_doc: Any,
    attestation_doc: Any,
    *,
    anchor: TrustAnchor,
    now: datetime,
    policy: Policy | None,
    insecure_any_td: bool = False,
    collateral_source: CollateralSource | None = None,
    request_bytes: bytes | None = None,
    response: dict[str, Any] | list[Any] | None = None,
    progress: VerificationProgress | None = None,
    gpu_rims: RimStore | None = None,
    gpu_anchors: GpuAnchors | None = None,
) -> VerifiedReceipt:
    """Check `receipt_doc` (``{"receipt", "signature"}``) against the receipt attestation
    `attestation_doc` at time `now`; raise `ReceiptRefused` at the first check that fails, its
    `exit_code` the failure class. `progress` records each named check (the CLI).

    `request_bytes`: the exact request body sent; `response`: the answer kept, a whole body (an
    object) or a stream's event payloads (a list). Unchecked when None. `gpu_rims` /
    `gpu_anchors`: a gpu-cc service's GPU evidence is checked as `verify_attestation` does.
    """
    steps = progress or VerificationProgress()
    parts: list[tuple[dict[str, Any], bytes, datetime]] = []
    steps.run("receipt document", lambda: parts.append(_parts(receipt_doc)))
    receipt, signature, time = parts[0]
    steps.run("attestation document is the receipts one", lambda: _receipts_nonce(attestation_doc))
    attested = _attested(
        steps,
        attestation_doc,
        anchor,
        now,
        policy,
        insecure_any_td,
        collateral_source,
        (gpu_rims, gpu_anchors),
    )
    steps.run("receipt names this attestation's quote", lambda: _quote(receipt, attestation_doc))
    steps.run(
        "receipt signed by the attested signing key",
        lambda: _signature(receipt, signature, attested.signing_key),
    )
    steps.run("claims are the attested ones", lambda: _claims(receipt, attested))
    steps.run("TCB status", lambda: _tcb(receipt, attested))
    steps.run("receipt time", lambda: _time(time, now))
    if request_bytes is not None:
        steps.run("request digest", lambda: _request(receipt, request_bytes))
    if response is not None:
        steps.run("response digest", lambda: _response(receipt, response))
    return VerifiedReceipt(receipt, time, attested, request_bytes is not None, response is not None)


def load_kept(raw: bytes) -> Any:
    """A kept document as JSON: a receipt, an attestation, a body, a list of stream payloads, or
    the ``data:`` lines of a stream (-> the list of its payloads before ``[DONE]``). Strict:
    ValueError on duplicate keys (a parser picking the other copy would see another answer),
    NaN or infinities, and anything that is not UTF-8 JSON."""
    text = raw.decode("utf-8")
    if text.lstrip().startswith("data:"):
        payloads = []
        for line in text.splitlines():
            if not line:
                continue
            if not line.startswith("data:"):
                raise ValueError("a stream line that is not data:")
            data = line.removeprefix("data:").removeprefix(" ")
            if data == "[DONE]":
                break
            payloads.append(_strict_json(data))
        return payloads
    return _strict_json(text)


def _strict_json(text: str) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys in an object")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)


def _refused(message: str, exit_code: int) -> ReceiptRefused:
    return ReceiptRefused(f"receipt refused: {message}", exit_code)


def _parts(doc: Any) -> tuple[dict[str, Any], bytes, datetime]:
    """The receipt, its signature and time, shape-checked (exit 3: not a receipt at all)."""
    malformed = errors.EXIT_PARSE
    if not isinstance(doc, dict) or set(doc) != {"receipt", "signature"}:
        raise _refused("not a {receipt, signature} document", malformed)
    receipt = doc["receipt"]
    if not isinstance(receipt, dict) or set(receipt) != _FIELDS:
        raise _refused(f"the receipt does not have exactly the {RECEIPT_SCHEMA} fields", malformed)
    if receipt["schema"] != RECEIPT_SCHEMA:
        raise _refused(f"schema {receipt['schema']!r} is not {RECEIPT_SCHEMA}", malformed)
    for name in ("request_sha256", "response_sha256"):
        if not _is_hex64(receipt[name]):
            raise _refused(f"{name} is not 64 lowercase hex digits", malformed)
    attestation = receipt["attestation"]
    if not (
        isinstance(attestation, dict)
        and set(attestation) == {"quote_sha256", "tcb_status"}
        and _is_hex64(attestation["quote_sha256"])
        and isinstance(attestation["tcb_status"], str)
    ):
        raise _refused("attestation must be {quote_sha256: hex, tcb_status: str}", malformed)
    if not isinstance(receipt["stream"], bool):
        raise _refused("stream is not a boolean", malformed)
    try:
        time = parse_time(receipt["time"])
        signature = from_b64url(doc["signature"])
    except ValueError as exc:
        raise _refused(str(exc), malformed) from None
    return receipt, signature, time


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def _receipts_nonce(doc: Any) -> None:
    nonce = doc.get("nonce") if isinstance(doc, dict) else None
    if nonce != RECEIPTS_NONCE:
        raise _refused(
            f"the attestation document is for nonce {nonce!r}, not the receipts nonce "
            f"{RECEIPTS_NONCE} (fetch GET /v1/attestation/receipts from the same boot)",
            errors.EXIT_BINDING,
        )


def _attested(
    steps: VerificationProgress,
    doc: Any,
    anchor: TrustAnchor,
    now: datetime,
    policy: Policy | None,
    insecure_any_td: bool,
    source: CollateralSource | None,
    gpu: tuple[RimStore | None, GpuAnchors | None] = (None, None),
) -> AttestedService:
    result: list[AttestedService] = []
    name = (
        f"attestation verified (reference values {policy.name!r})"
        if policy is not None
        else "attestation verified (ANY TD: reference values NOT checked)"
    )

    def check() -> None:
        try:
            result.append(
                verify_attestation(
                    doc,
                    RECEIPTS_NONCE,
                    anchor,
                    now=now,
                    policy=policy,
                    insecure_any_td=insecure_any_td,
                    collateral_source=source,
                    gpu_rims=gpu[0],
                    gpu_anchors=gpu[1],
                )
            )
        except AttestationError as exc:
            # the failure class of what refused it (collateral, TCB, policy...), else 4
            cause = exc.__cause__
            code = cause.exit_code if isinstance(cause, AttestationError) else exc.exit_code
            raise ReceiptRefused(str(exc), code) from exc

    steps.run(name, check)
    return result[0]


def _quote(receipt: dict[str, Any], doc: dict[str, Any]) -> None:
    named = receipt["attestation"]["quote_sha256"]
    try:
        actual = hashlib.sha256(from_b64url(str(doc.get("quote", "")))).hexdigest()
    except ValueError:
        actual = "(no quote)"
    if not hmac.compare_digest(named, actual):
        raise _refused(
            f"it was issued under the attestation with quote sha256 {named}, not this "
            f"document's ({actual}): another boot or another TD",
            errors.EXIT_BINDING,
        )


def _signature(receipt: dict[str, Any], signature: bytes, signing_key: bytes) -> None:
    try:
        message = signed_bytes(receipt)
        Ed25519PublicKey.from_public_bytes(signing_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise _refused(
            "its signature does not verify against the attested signing key: altered after "
            "signing, or signed by another key",
            errors.EXIT_SIGNATURE,
        ) from None


def _claims(receipt: dict[str, Any], attested: AttestedService) -> None:
    bound = {
        "model": attested.model,
        "profile": attested.profile,
        "reference_values_id": attested.reference_values_id,
    }
    for name, value in bound.items():
        if receipt[name] != value:
            raise _refused(
                f"it claims {name} {receipt[name]!r}, the attestation binds {value!r}",
                errors.EXIT_BINDING,
            )


def _tcb(receipt: dict[str, Any], attested: AttestedService) -> None:
    claimed = receipt["attestation"]["tcb_status"]
    if claimed not in (UNVERIFIED, attested.tcb_status):
        raise _refused(
            f"it states TCB status {claimed}, the quote verifies as {attested.tcb_status} at "
            "the verification time with this collateral (verify at the receipt's time, with "
            "collateral current then)",
            errors.EXIT_TCB,
        )


def _time(time: datetime, now: datetime) -> None:
    if time > now + CLOCK_SKEW:
        raise _refused(
            f"it is dated {time.isoformat()}, after the verification time {now.isoformat()}",
            errors.EXIT_BINDING,
        )


def _request(receipt: dict[str, Any], request_bytes: bytes) -> None:
    digest = hashlib.sha256(request_bytes).hexdigest()
    if not hmac.compare_digest(digest, receipt["request_sha256"]):
        raise _refused(
            f"it covers a request with SHA-256 {receipt['request_sha256']}, not these request "
            f"bytes ({digest})",
            errors.EXIT_BINDING,
        )


def _response(receipt: dict[str, Any], response: dict[str, Any] | list[Any]) -> None:
    kind = "stream" if receipt["stream"] else "whole answer"
    if isinstance(response, list) != receipt["stream"]:
        raise _refused(f"it covers a {kind}, and the answer given is not one", errors.EXIT_BINDING)
    try:
        digest = response_sha256(response)
    except (ValueError, TypeError, AttributeError):
        raise _refused(
            "the answer given is not canonical JSON objects", errors.EXIT_PARSE
        ) from None
    if not hmac.compare_digest(digest, receipt["response_sha256"]):
        raise _refused(
            f"it covers a {kind} with digest {receipt['response_sha256']}, not the answer given "
            f"({digest}): the answer was altered, or is another one",
            errors.EXIT_BINDING,
        )
