"""tdllm-e2e/2: the wire format of the end-to-end encrypted mode (seed 001), both sides.

Request: the client HPKE-encrypts (RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
ChaCha20-Poly1305, via pyhpke) the OpenAI request JSON to the service key it verified in
/v1/attestation, and POSTs ``{"enc": b64url, "ciphertext": b64url}``. Only the TD holds the
private key, so only code inside it sees the prompt.

Both ends then derive per-request keys with the HPKE exporter, which only the holder of this
request's context can compute: a whole answer is sealed under ``export(RESPONSE_LABEL, 32)``,
a stream's records under ``export(STREAM_LABEL, 32)`` with the record's sequence number as the
nonce and in the AAD (with a final flag), so records cannot be reordered, dropped, replayed
across requests or cut short without the client noticing. Plaintexts are padded to 256-byte
blocks so ciphertext lengths do not spell out token lengths.

Every sealed answer (and a stream's final record) carries an Ed25519 signature by the attested
signing key over `signed_bytes` (docs/api.md lists the exact bytes): it binds the request's
ciphertext to the answer's ciphertext, so a third party holding the attestation can check which
TD produced which answer without seeing either plaintext.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from pyhpke.context_interface import ContextInterface

from tdllm.api.identity import canonical_json
from tdllm_attest.broker.protocol import b64url, from_b64url

PROTOCOL = "tdllm-e2e/2"
INFO = PROTOCOL.encode()
RESPONSE_LABEL = b"tdllm-e2e/2 response"
RESPONSE_AAD = b"tdllm-e2e/2 response"
STREAM_LABEL = b"tdllm-e2e/2 stream"
RECORD_AAD = b"tdllm-e2e/2 record"
SIGNATURE_TAG = b"tdllm-e2e/2 signature\x00"
PAD_BLOCK = 256
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)


class E2eDecryptError(Exception):
    """A ciphertext, signature or envelope did not authenticate; the message names no content."""


@dataclass(frozen=True, repr=False)
class ExchangeKeys:
    """What both ends share for one request: its digest and the two exported answer keys."""

    request_sha256: bytes  # SHA-256(enc || ciphertext), what signatures bind the answer to
    response: bytes
    stream: bytes


def seal_request(
    service_key: bytes, payload: dict[str, Any]
) -> tuple[dict[str, str], ExchangeKeys]:
    """(envelope to POST, keys for the answer) for `payload` to the raw X25519 `service_key`."""
    enc, context = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(service_key), INFO)
    ciphertext = context.seal(json.dumps(payload).encode())
    return {"enc": b64url(enc), "ciphertext": b64url(ciphertext)}, _keys(context, enc, ciphertext)


def open_request(private_key: bytes, envelope: Any) -> tuple[Any, ExchangeKeys]:
    """(decrypted payload, keys); raises `E2eDecryptError` on any defect."""
    if not isinstance(envelope, dict) or set(envelope) != {"enc", "ciphertext"}:
        raise E2eDecryptError("the envelope must be {enc, ciphertext}")
    try:
        enc = from_b64url(str(envelope["enc"]))
        ciphertext = from_b64url(str(envelope["ciphertext"]))
        context = SUITE.create_recipient_context(
            enc, SUITE.kem.deserialize_private_key(private_key), INFO
        )
        plaintext = context.open(ciphertext)
        return json.loads(plaintext), _keys(context, enc, ciphertext)
    except Exception:  # pyhpke raises its own types; any failure is "did not authenticate"
        raise E2eDecryptError("the request does not decrypt to this service key") from None


def signed_bytes(kind: str, request_sha256: bytes, response_sha256: bytes) -> bytes:
    """The exact bytes the attested Ed25519 key signs ("response" or "stream")."""
    document = {
        "kind": kind,
        "request_sha256": request_sha256.hex(),
        "response_sha256": response_sha256.hex(),
    }
    return SIGNATURE_TAG + canonical_json(document)


def seal_response(
    keys: ExchangeKeys, signer: Ed25519PrivateKey, status: int, body: Any
) -> dict[str, str]:
    nonce = secrets.token_bytes(12)
    plaintext = _pad(json.dumps({"status": status, "body": body}).encode())
    ciphertext = ChaCha20Poly1305(keys.response).encrypt(nonce, plaintext, RESPONSE_AAD)
    message = signed_bytes(
        "response", keys.request_sha256, hashlib.sha256(nonce + ciphertext).digest()
    )
    return {
        "nonce": b64url(nonce),
        "ciphertext": b64url(ciphertext),
        "signature": b64url(signer.sign(message)),
    }


def open_response(keys: ExchangeKeys, signing_key: bytes, envelope: Any) -> tuple[int, Any]:
    """(status, body) of a whole answer; `E2eDecryptError` if tampered, forged or unsigned."""
    try:
        nonce = from_b64url(str(envelope["nonce"]))
        ciphertext = from_b64url(str(envelope["ciphertext"]))
        signature = from_b64url(str(envelope["signature"]))
    except (KeyError, TypeError, ValueError):
        raise E2eDecryptError("the response is not a signed tdllm-e2e/2 envelope") from None
    response_sha256 = hashlib.sha256(nonce + ciphertext).digest()
    _verify(signing_key, signature, signed_bytes("response", keys.request_sha256, response_sha256))
    try:
        plaintext = ChaCha20Poly1305(keys.response).decrypt(nonce, ciphertext, RESPONSE_AAD)
        doc = json.loads(plaintext)
        return int(doc["status"]), doc["body"]
    except (InvalidTag, KeyError, TypeError, ValueError):
        raise E2eDecryptError("the response does not decrypt: tampered or not ours") from None


@dataclass
class _Records:
    """Sequence numbers and the running transcript hash, shared by both ends of a stream."""

    key: bytes
    seq: int = 0
    transcript: Any = field(default_factory=hashlib.sha256)

    def nonce_and_aad(self, final: bool) -> tuple[bytes, bytes]:
        nonce = self.seq.to_bytes(12, "big")
        return nonce, RECORD_AAD + self.seq.to_bytes(8, "big") + (b"\x01" if final else b"\x00")

    def absorb(self, ciphertext: bytes) -> None:
        self.transcript.update(len(ciphertext).to_bytes(8, "big") + ciphertext)
        self.seq += 1


class StreamSealer:
    """Service side: each stream chunk becomes one sealed record; `final` signs the transcript."""

    def __init__(self, keys: ExchangeKeys, signer: Ed25519PrivateKey) -> None:
        self._records = _Records(keys.stream)
        self._request_sha256 = keys.request_sha256
        self._signer = signer

    def record(self, chunk: Any) -> dict[str, Any]:
        return {"final": False, "ciphertext": b64url(self._seal(chunk, final=False))}

    def final(self, status: int, body: Any) -> dict[str, Any]:
        ciphertext = self._seal({"status": status, "body": body}, final=True)
        digest = self._records.transcript.digest()
        signature = self._signer.sign(signed_bytes("stream", self._request_sha256, digest))
        return {"final": True, "ciphertext": b64url(ciphertext), "signature": b64url(signature)}

    def _seal(self, value: Any, *, final: bool) -> bytes:
        nonce, aad = self._records.nonce_and_aad(final)
        ciphertext = ChaCha20Poly1305(self._records.key).encrypt(
            nonce, _pad(json.dumps(value).encode()), aad
        )
        self._records.absorb(ciphertext)
        return ciphertext


class StreamOpener:
    """Client side: opens records strictly in order; only a signed final record ends a stream."""

    def __init__(self, keys: ExchangeKeys, signing_key: bytes) -> None:
        self._records = _Records(keys.stream)
        self._request_sha256 = keys.request_sha256
        self._signing_key = signing_key
        self.finished = False

    def open(self, record: Any) -> tuple[bool, Any]:
        """(final, plaintext): a chunk, or the final record's {"status", "body"}."""
        if self.finished:
            raise E2eDecryptError("the encrypted stream continues after its final record")
        seq = self._records.seq
        try:
            final = record["final"]
            ciphertext = from_b64url(str(record["ciphertext"]))
            if not isinstance(final, bool):
                raise TypeError
            nonce, aad = self._records.nonce_and_aad(final)
            value = json.loads(ChaCha20Poly1305(self._records.key).decrypt(nonce, ciphertext, aad))
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise E2eDecryptError(
                f"stream record {seq} does not decrypt: reordered, dropped, tampered or not ours"
            ) from None
        self._records.absorb(ciphertext)
        if final:
            try:
                signature = from_b64url(str(record["signature"]))
            except (KeyError, ValueError):
                raise E2eDecryptError("the stream's final record carries no signature") from None
            digest = self._records.transcript.digest()
            _verify(
                self._signing_key, signature, signed_bytes("stream", self._request_sha256, digest)
            )
            if not isinstance(value, dict) or not isinstance(value.get("status"), int):
                raise E2eDecryptError("the stream's final record is malformed")
            self.finished = True
        return final, value

    def finish(self) -> None:
        """Call when the transport ends: a stream without its signed final record was cut."""
        if not self.finished:
            raise E2eDecryptError(
                f"the encrypted stream ended after {self._records.seq} records without its "
                "signed final record: truncated"
            )


def _verify(signing_key: bytes, signature: bytes, message: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(signing_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise E2eDecryptError(
            "the answer's signature does not verify against the attested signing key"
        ) from None


def _pad(plaintext: bytes) -> bytes:
    """Spaces up to the next PAD_BLOCK boundary: valid JSON whitespace, hides exact lengths."""
    return plaintext + b" " * (-len(plaintext) % PAD_BLOCK)


def _keys(context: ContextInterface, enc: bytes, ciphertext: bytes) -> ExchangeKeys:
    return ExchangeKeys(
        request_sha256=hashlib.sha256(enc + ciphertext).digest(),
        response=context.export(RESPONSE_LABEL, 32),
        stream=context.export(STREAM_LABEL, 32),
    )
