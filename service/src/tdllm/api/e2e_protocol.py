"""tdllm-e2e/1: the wire format of the end-to-end encrypted mode (seed 001), both sides.

Request: the client HPKE-encrypts (RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
ChaCha20-Poly1305, via pyhpke) the OpenAI request JSON to the service key it verified in
/v1/attestation, and POSTs ``{"enc": b64url, "ciphertext": b64url}``. Only the TD holds the
private key, so only code inside it sees the prompt.

Response: both ends derive a 32-byte key with the HPKE exporter (``export(RESPONSE_LABEL, 32)``),
which only the holder of this request's context can compute; the service answers
``{"nonce": b64url, "ciphertext": b64url}`` with ChaCha20-Poly1305 under that key, over
``{"status": int, "body": <the plain OpenAI answer or error>}``. A replayed or forged response
does not decrypt, because each request has its own key.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from pyhpke.context_interface import ContextInterface

from tdllm_attest.broker.protocol import b64url, from_b64url

PROTOCOL = "tdllm-e2e/1"
INFO = PROTOCOL.encode()
RESPONSE_LABEL = b"tdllm-e2e/1 response"
RESPONSE_AAD = b"tdllm-e2e/1 response"
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)


class E2eDecryptError(Exception):
    """A ciphertext or envelope did not authenticate; the message names no content."""


def seal_request(service_key: bytes, payload: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """(envelope to POST, response key) for `payload` to the raw X25519 `service_key`."""
    enc, context = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(service_key), INFO)
    ciphertext = context.seal(json.dumps(payload).encode())
    return {"enc": b64url(enc), "ciphertext": b64url(ciphertext)}, _response_key(context)


def open_request(private_key: bytes, envelope: Any) -> tuple[Any, bytes]:
    """(decrypted payload, response key); raises `E2eDecryptError` on any defect."""
    if not isinstance(envelope, dict) or set(envelope) != {"enc", "ciphertext"}:
        raise E2eDecryptError("the envelope must be {enc, ciphertext}")
    try:
        context = SUITE.create_recipient_context(
            from_b64url(str(envelope["enc"])), SUITE.kem.deserialize_private_key(private_key), INFO
        )
        plaintext = context.open(from_b64url(str(envelope["ciphertext"])))
        return json.loads(plaintext), _response_key(context)
    except Exception:  # pyhpke raises its own types; any failure is "did not authenticate"
        raise E2eDecryptError("the request does not decrypt to this service key") from None


def seal_response(key: bytes, status: int, body: Any) -> dict[str, str]:
    nonce = secrets.token_bytes(12)
    plaintext = json.dumps({"status": status, "body": body}).encode()
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, RESPONSE_AAD)
    return {"nonce": b64url(nonce), "ciphertext": b64url(ciphertext)}


def open_response(key: bytes, envelope: Any) -> tuple[int, Any]:
    """(status, body) of the service's answer; raises `E2eDecryptError` if it was tampered."""
    try:
        nonce = from_b64url(str(envelope["nonce"]))
        plaintext = ChaCha20Poly1305(key).decrypt(
            nonce, from_b64url(str(envelope["ciphertext"])), RESPONSE_AAD
        )
        doc = json.loads(plaintext)
        return int(doc["status"]), doc["body"]
    except (InvalidTag, KeyError, TypeError, ValueError):
        raise E2eDecryptError("the response does not decrypt: tampered or not ours") from None


def _response_key(context: ContextInterface) -> bytes:
    return context.export(RESPONSE_LABEL, 32)
