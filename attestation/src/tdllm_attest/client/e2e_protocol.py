"""tdllm-e2e/3: the wire format of the end-to-end encrypted mode, both sides (docs/api.md).

Request: the client HPKE-seals (RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
ChaCha20-Poly1305, info ``tdllm-e2e/3``, via pyhpke) the JSON ``{"api_key": str | null,
"request": <the OpenAI chat request>}``, padded with spaces to a size bucket (the next power of
two, at least 1 KiB), to the service key it verified in /v1/attestation, and POSTs
``{"enc": b64url, "ciphertext": b64url}``. Only the TD holds the private key, so only code inside
it sees the prompt, and the API key never crosses the host in clear.

Answer keys: both ends export ``S = export("tdllm-e2e/3 exporter", 32)`` from the request's HPKE
context. HPKE base mode has no replay protection (RFC 9180 §9.7), so a replayed envelope gives
the TD the same S again; every answer therefore draws a fresh 32-byte salt, sent in clear in the
first thing the answer sends, and is sealed under ``HKDF-SHA256(IKM=S, salt, info)`` with info
``tdllm-e2e/3 response`` (a whole answer) or ``tdllm-e2e/3 stream`` (stream records). Two answers
to one request never share a key, so neither a two-time pad nor a record spliced from one answer
into the other is possible. (The service also refuses replays outright: 409 ``e2e_replay``.)

A whole answer is one ChaCha20-Poly1305 ciphertext. A stream is a sequence of records, each
sealed with its sequence number as the nonce and in the AAD (with a final flag), so records
cannot be reordered, dropped, duplicated or cut short without the client noticing; a record
carries a list of chunks (the service coalesces them on a cadence). Every plaintext is padded to
a bucket like the request, so sizes tell token counts only to a factor of two.

Every whole answer (and a stream's final record) carries an Ed25519 signature by the attested
signing key over `signed_bytes`: it binds the request's ciphertext to the salt and the answer's
ciphertext, so a third party holding the attestation can check which TD produced which answer
without seeing either plaintext.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from pyhpke.context_interface import ContextInterface

from tdllm_attest.errors import AttestationError
from tdllm_attest.wire import b64url, canonical_json, from_b64url

PROTOCOL = "tdllm-e2e/3"
INFO = PROTOCOL.encode()
EXPORTER_LABEL = b"tdllm-e2e/3 exporter"
RESPONSE_INFO = b"tdllm-e2e/3 response"
STREAM_INFO = b"tdllm-e2e/3 stream"
RESPONSE_AAD = b"tdllm-e2e/3 response"
RECORD_AAD = b"tdllm-e2e/3 record"
SIGNATURE_TAG = b"tdllm-e2e/3 signature\x00"
SALT_BYTES = 32
MIN_BUCKET = 1024  # plaintexts are padded to max(MIN_BUCKET, the next power of two)
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)
# The profiles under which the mode exists: td-only keeps everything in the TD and masked shows
# the untrusted device only one-time-padded values; split and obfuscated show it prompt-derived
# activations by design (docs/security.md, A8), so there end-to-end encryption would be a lie.
# gpu-cc: the prompts reach a GPU whose evidence the client verified (client/attest.py)
E2E_PROFILES = ("td-only", "masked", "gpu-cc")


class E2eDecryptError(AttestationError):
    """A ciphertext, signature or envelope did not authenticate; the message names no content."""


@dataclass(frozen=True, repr=False)
class ExchangeKeys:
    """What both ends share for one request; answer keys are derived from `secret` per answer."""

    request_sha256: bytes  # SHA-256(enc || ciphertext), what signatures bind the answer to
    enc_sha256: bytes  # SHA-256(enc): names the HPKE context, what the replay cache remembers
    secret: bytes  # export(EXPORTER_LABEL, 32): the IKM of every answer key


@dataclass(frozen=True, repr=False)
class SealedRequest:
    """The decrypted plaintext: the API key that authenticates it and the plain OpenAI request."""

    api_key: str | None
    request: Any


def seal_request(
    service_key: bytes, request: Any, api_key: str | None = None
) -> tuple[dict[str, str], ExchangeKeys]:
    """(envelope to POST, keys for the answer) for `request` to the raw X25519 `service_key`."""
    plaintext = json.dumps({"api_key": api_key, "request": request}).encode()
    return seal_plaintext(service_key, plaintext)


def seal_plaintext(service_key: bytes, plaintext: bytes) -> tuple[dict[str, str], ExchangeKeys]:
    """`seal_request` of exactly these plaintext bytes (padded), whatever they hold: what a test
    or fuzzer needs to reach the service's parsing of a request it could not JSON-encode."""
    enc, context = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(service_key), INFO)
    ciphertext = context.seal(pad(plaintext))
    return {"enc": b64url(enc), "ciphertext": b64url(ciphertext)}, _keys(context, enc, ciphertext)


def open_request(private_key: bytes, envelope: Any) -> tuple[Any, ExchangeKeys]:
    """(decrypted plaintext JSON, keys); raises `E2eDecryptError` on any defect."""
    if not isinstance(envelope, dict) or set(envelope) != {"enc", "ciphertext"}:
        raise E2eDecryptError("the envelope must be {enc, ciphertext}")
    try:
        enc = from_b64url(str(envelope["enc"]))
        ciphertext = from_b64url(str(envelope["ciphertext"]))
        context = SUITE.create_recipient_context(
            enc, SUITE.kem.deserialize_private_key(private_key), INFO
        )
        plaintext = context.open(ciphertext)
        return json.loads(plaintext.rstrip(b" ")), _keys(context, enc, ciphertext)
    except Exception:  # pyhpke raises its own types; any failure is "did not authenticate"
        raise E2eDecryptError("the request does not decrypt to this service key") from None


def parse_request(plaintext: Any) -> SealedRequest:
    """The sealed ``{"api_key", "request"}``; `ValueError` (a message for the client) if not."""
    if not isinstance(plaintext, dict) or set(plaintext) != {"api_key", "request"}:
        raise ValueError(f"the sealed plaintext must be {{api_key, request}} ({PROTOCOL})")
    api_key = plaintext["api_key"]
    if api_key is not None and not (
        isinstance(api_key, str) and api_key.isascii() and api_key.isprintable()
    ):
        raise ValueError("api_key must be null or printable ASCII")
    return SealedRequest(api_key, plaintext["request"])


def signed_bytes(kind: str, request_sha256: bytes, response_sha256: bytes) -> bytes:
    """The exact bytes the attested Ed25519 key signs ("response" or "stream")."""
    document = {
        "kind": kind,
        "request_sha256": request_sha256.hex(),
        "response_sha256": response_sha256.hex(),
    }
    return SIGNATURE_TAG + canonical_json(document)


def answer_key(keys: ExchangeKeys, salt: bytes, info: bytes) -> bytes:
    """The key of one answer: fresh for every salt, so answers to one request never share it."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(keys.secret)


def seal_response(
    keys: ExchangeKeys, signer: Ed25519PrivateKey, status: int, body: Any
) -> dict[str, str]:
    salt, nonce = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(12)
    plaintext = pad(json.dumps({"status": status, "body": body}).encode())
    aead = ChaCha20Poly1305(answer_key(keys, salt, RESPONSE_INFO))
    ciphertext = aead.encrypt(nonce, plaintext, RESPONSE_AAD)
    digest = hashlib.sha256(salt + nonce + ciphertext).digest()
    return {
        "salt": b64url(salt),
        "nonce": b64url(nonce),
        "ciphertext": b64url(ciphertext),
        "signature": b64url(signer.sign(signed_bytes("response", keys.request_sha256, digest))),
    }


def open_response(keys: ExchangeKeys, signing_key: bytes, envelope: Any) -> tuple[int, Any]:
    """(status, body) of a whole answer; `E2eDecryptError` if tampered, forged or unsigned."""
    try:
        salt = _salt(envelope["salt"])
        nonce = from_b64url(str(envelope["nonce"]))
        ciphertext = from_b64url(str(envelope["ciphertext"]))
        signature = from_b64url(str(envelope["signature"]))
    except (KeyError, TypeError, ValueError):
        raise E2eDecryptError(f"the response is not a signed {PROTOCOL} envelope") from None
    digest = hashlib.sha256(salt + nonce + ciphertext).digest()
    _verify(signing_key, signature, signed_bytes("response", keys.request_sha256, digest))
    try:
        aead = ChaCha20Poly1305(answer_key(keys, salt, RESPONSE_INFO))
        doc = json.loads(aead.decrypt(nonce, ciphertext, RESPONSE_AAD))
        return int(doc["status"]), doc["body"]
    except (InvalidTag, KeyError, TypeError, ValueError):
        raise E2eDecryptError("the response does not decrypt: tampered or not ours") from None


@dataclass
class _Records:
    """One answer's stream key, sequence number and running transcript hash (both ends)."""

    key: bytes
    salt: bytes
    seq: int = 0
    transcript: Any = field(default_factory=hashlib.sha256)

    def __post_init__(self) -> None:
        self.transcript.update(self.salt)  # the signature covers the salt too

    def nonce_and_aad(self, final: bool) -> tuple[bytes, bytes]:
        nonce = self.seq.to_bytes(12, "big")
        return nonce, RECORD_AAD + self.seq.to_bytes(8, "big") + (b"\x01" if final else b"\x00")

    def absorb(self, ciphertext: bytes) -> None:
        self.transcript.update(len(ciphertext).to_bytes(8, "big") + ciphertext)
        self.seq += 1


class StreamSealer:
    """Service side: each `record` seals a list of chunks; `final` signs the transcript.

    Every sealer draws its own salt, so two answers to one request have unrelated keys.
    """

    def __init__(self, keys: ExchangeKeys, signer: Ed25519PrivateKey) -> None:
        salt = secrets.token_bytes(SALT_BYTES)
        self._records = _Records(answer_key(keys, salt, STREAM_INFO), salt)
        self._request_sha256 = keys.request_sha256
        self._signer = signer

    def record(self, chunks: list[Any]) -> dict[str, Any]:
        head = self._head()
        return head | {"final": False, "ciphertext": self._seal({"chunks": chunks}, final=False)}

    def final(self, status: int, body: Any) -> dict[str, Any]:
        head = self._head()
        ciphertext = self._seal({"status": status, "body": body}, final=True)
        digest = self._records.transcript.digest()
        signature = self._signer.sign(signed_bytes("stream", self._request_sha256, digest))
        return head | {"final": True, "ciphertext": ciphertext, "signature": b64url(signature)}

    def _head(self) -> dict[str, str]:
        """The first record of an answer carries its salt, in clear."""
        return {"salt": b64url(self._records.salt)} if self._records.seq == 0 else {}

    def _seal(self, value: Any, final: bool) -> str:
        nonce, aad = self._records.nonce_and_aad(final)
        plaintext = pad(json.dumps(value).encode())
        ciphertext = ChaCha20Poly1305(self._records.key).encrypt(nonce, plaintext, aad)
        self._records.absorb(ciphertext)
        return b64url(ciphertext)


class StreamOpener:
    """Client side: authenticates records strictly in order before anything in them is shown;
    only a signed final record ends a stream."""

    def __init__(self, keys: ExchangeKeys, signing_key: bytes) -> None:
        self._keys = keys
        self._records: _Records | None = None  # keyed by the salt in the first record
        self._signing_key = signing_key
        self.finished = False

    def open(self, record: Any) -> tuple[bool, Any]:
        """(False, the record's chunks) or (True, the final record's {"status", "body"})."""
        if self.finished:
            raise E2eDecryptError("the encrypted stream continues after its final record")
        records = self._keyed(record)
        seq = records.seq
        try:
            final = record["final"]
            ciphertext = from_b64url(str(record["ciphertext"]))
            if not isinstance(final, bool):
                raise TypeError
            nonce, aad = records.nonce_and_aad(final)
            value = json.loads(ChaCha20Poly1305(records.key).decrypt(nonce, ciphertext, aad))
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise E2eDecryptError(
                f"stream record {seq} does not decrypt: reordered, dropped, tampered or not ours"
            ) from None
        records.absorb(ciphertext)
        if final:
            return True, self._finish(record, records, value)
        if not isinstance(value, dict) or not isinstance(value.get("chunks"), list):
            raise E2eDecryptError(f"stream record {seq} is malformed")
        return False, value["chunks"]

    def finish(self) -> None:
        """Call when the transport ends: a stream without its signed final record was cut."""
        if not self.finished:
            count = self._records.seq if self._records else 0
            raise E2eDecryptError(
                f"the encrypted stream ended after {count} records without its "
                "signed final record: truncated"
            )

    def _keyed(self, record: Any) -> _Records:
        """The answer's key: from the salt of the first record; no later record may carry one."""
        has_salt = isinstance(record, dict) and "salt" in record
        if self._records is not None:
            if has_salt:
                raise E2eDecryptError(f"stream record {self._records.seq} carries a second salt")
            return self._records
        try:
            salt = _salt(record["salt"])
        except (KeyError, TypeError, ValueError):
            raise E2eDecryptError("stream record 0 carries no salt") from None
        self._records = _Records(answer_key(self._keys, salt, STREAM_INFO), salt)
        return self._records

    def _finish(self, record: Any, records: _Records, value: Any) -> Any:
        try:
            signature = from_b64url(str(record["signature"]))
        except (KeyError, ValueError):
            raise E2eDecryptError("the stream's final record carries no signature") from None
        digest = records.transcript.digest()
        _verify(
            self._signing_key, signature, signed_bytes("stream", self._keys.request_sha256, digest)
        )
        if not isinstance(value, dict) or not isinstance(value.get("status"), int):
            raise E2eDecryptError("the stream's final record is malformed")
        self.finished = True
        return value


def bucket(size: int) -> int:
    """The padded size of a `size`-byte plaintext: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, size - 1).bit_length())


def pad(plaintext: bytes) -> bytes:
    """Spaces up to `bucket`: valid JSON whitespace, so sizes tell lengths to a factor of two."""
    return plaintext + b" " * (bucket(len(plaintext)) - len(plaintext))


def _salt(text: Any) -> bytes:
    salt = from_b64url(str(text))
    if len(salt) != SALT_BYTES:
        raise ValueError("a salt is 32 bytes")
    return salt


def _verify(signing_key: bytes, signature: bytes, message: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(signing_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise E2eDecryptError(
            "the answer's signature does not verify against the attested signing key"
        ) from None


def _keys(context: ContextInterface, enc: bytes, ciphertext: bytes) -> ExchangeKeys:
    return ExchangeKeys(
        request_sha256=hashlib.sha256(enc + ciphertext).digest(),
        enc_sha256=hashlib.sha256(enc).digest(),
        secret=context.export(EXPORTER_LABEL, 32),
    )
