"""tdllm-receipt/1: the signed receipt of every answer, both sides (docs/api.md, "Receipts").

The service signs, with the Ed25519 key its receipt attestation binds, what it answered to which
request bytes, how it sampled, as which model and profile, under which quote and TCB status and
when. A receipt can be checked offline, long after, by anyone holding it and that attestation
document (`tdllm_attest.client.receipt.verify_receipt`, `tdllm-verify receipt`):

    signature = Ed25519(b"tdllm-receipt/1\\0" || canonical_json(receipt))

    receipt = {
        "schema": "tdllm-receipt/1",
        "time": "<the TD's clock, UTC: YYYY-MM-DDTHH:MM:SS.ffffffZ>",
        "endpoint": "/v1/chat/completions" | "/v1/completions",
        "stream": <bool: which response digest rule applies>,
        "request_sha256": "<hex SHA-256 of the exact request body bytes the handler received>",
        "response_sha256": "<hex; `response_sha256` below>",
        "sampling": {"max_tokens": int, "n": 1, "seed": int | null, "stop": [str],
                     "temperature": "<decimal>", "top_k": int (0: off), "top_p": "<decimal>"},
        "model": <the model claim the attestation binds>,
        "profile": "<the protection profile>",
        "reference_values_id": "<id>" | null,
        "attestation": {"quote_sha256": "<hex SHA-256 of the receipt attestation's quote>",
                        "tcb_status": "<the TD's own verification of that quote>" | "unverified"}}

Temperature and top_p are decimal strings (Python's shortest repr): canonical JSON stays within
the value types every implementation writes alike (no floats in signed bytes).

The response digest is over canonical JSON of what the client received, without the receipt:
`canonical_json(body without "tdllm_receipt")` for a whole answer, and for a stream
`canonical_json([payload_0, ..., payload_n])` over the JSON of every ``data:`` event before
``[DONE]``, in order, with the ``tdllm_receipt`` member removed (only the last one carries it).
The answers hold only strings, integers, booleans and null, so this is exact; and a client that
kept parsed objects (the official `openai` client's `to_dict()`) can check it too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm_attest.wire import b64url, canonical_json

RECEIPT_SCHEMA = "tdllm-receipt/1"
SIGNATURE_TAG = RECEIPT_SCHEMA.encode() + b"\x00"
RECEIPT_FIELD = "tdllm_receipt"  # where an answer carries its receipt
RECEIPTS_PATH = "/v1/attestation/receipts"
# The fixed nonce of the receipt attestation: everyone can recompute it, and no client nonce
# can collide with a receipt attestation by accident (it is the hash of a fixed label).
RECEIPTS_NONCE = hashlib.sha256(b"tdllm-receipts/1").hexdigest()
UNVERIFIED = "unverified"  # the TD had no collateral (or trust anchor) to verify its own quote
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def signed_bytes(receipt: Mapping[str, Any]) -> bytes:
    """The exact bytes the attested signing key signs; ValueError if not canonical JSON."""
    return SIGNATURE_TAG + canonical_json(receipt)


def sign_receipt(receipt: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``{"receipt", "signature"}``: what an answer carries as ``tdllm_receipt``."""
    return {"receipt": dict(receipt), "signature": b64url(key.sign(signed_bytes(receipt)))}


def format_time(moment: datetime) -> str:
    """UTC with microseconds and a ``Z``: one spelling per instant."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> datetime:
    """A receipt's time; ValueError unless it is ISO 8601 in UTC (``Z``)."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise ValueError("time is not ISO 8601 UTC (YYYY-MM-DDTHH:MM:SS[.ffffff]Z)")
    return datetime.fromisoformat(text)


def decimal(value: float) -> str:
    """A sampling float as the receipt writes it."""
    return repr(float(value))


def without_receipt(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != RECEIPT_FIELD}


def body_sha256(body: Mapping[str, Any]) -> str:
    """The response digest of a whole (non-streamed) answer."""
    return hashlib.sha256(canonical_json(without_receipt(body))).hexdigest()


class StreamDigest:
    """The response digest of a stream, fed one event payload at a time.

    Hashes ``[`` then the payloads' canonical JSON joined by ``,`` then ``]``: exactly
    canonical_json of the list, without holding the stream in memory.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"[")
        self._first = True

    def add(self, payload: Mapping[str, Any]) -> None:
        self._hash.update((b"" if self._first else b",") + canonical_json(without_receipt(payload)))
        self._first = False

    def hexdigest(self) -> str:
        final = self._hash.copy()
        final.update(b"]")
        return final.hexdigest()


def stream_sha256(payloads: Iterable[Mapping[str, Any]]) -> str:
    digest = StreamDigest()
    for payload in payloads:
        digest.add(payload)
    return digest.hexdigest()


def response_sha256(response: Mapping[str, Any] | list[Any]) -> str:
    """The digest of a kept answer: a whole body (an object) or a stream's payloads (a list)."""
    if isinstance(response, list):
        return stream_sha256(response)
    return body_sha256(response)


def receipt_of(response: Mapping[str, Any] | list[Any]) -> Any:
    """The receipt an answer carries (a body's field, a stream's last payload's), else None."""
    if isinstance(response, list):
        last = response[-1] if response else None
        return last.get(RECEIPT_FIELD) if isinstance(last, Mapping) else None
    return response.get(RECEIPT_FIELD)
