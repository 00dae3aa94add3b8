"""The service's ephemeral keys and how a quote binds them to a client's nonce.

Two key pairs are generated in memory at start and never stored, so keys seen in an attestation
belong to exactly one boot of one TD: an X25519 key the end-to-end encrypted mode encrypts
requests to, and an Ed25519 key that signs every end-to-end answer (X25519 cannot sign).
/v1/attestation proves both live in the TD:

    REPORTDATA = SHA-512(b"tdllm-api-attest/2\\0" || canonical_json({
        "nonce": <the client's nonce, lowercase hex>,
        "service_public_key": {"kty": "OKP", "crv": "X25519", "x": <base64url, unpadded>},
        "signing_public_key": {"kty": "OKP", "crv": "Ed25519", "x": <base64url, unpadded>}}))

canonical_json is sorted keys, no whitespace, UTF-8 (the same as the key-broker protocol).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tdllm_attest.broker.protocol import b64url

ATTEST_PROTOCOL = "tdllm-api-attest/2"
DOMAIN_TAG = ATTEST_PROTOCOL.encode() + b"\x00"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def okp_jwk(crv: str, raw: bytes) -> dict[str, str]:
    return {"kty": "OKP", "crv": crv, "x": b64url(raw)}


def report_data(nonce_hex: str, public_jwk: dict[str, str], signing_jwk: dict[str, str]) -> bytes:
    """The 64 REPORTDATA bytes for a client nonce and the service keys (see module docstring)."""
    document = {
        "nonce": nonce_hex,
        "service_public_key": public_jwk,
        "signing_public_key": signing_jwk,
    }
    return hashlib.sha512(DOMAIN_TAG + canonical_json(document)).digest()


@dataclass
class ServiceIdentity:
    private_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    signing_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate, repr=False)

    @property
    def public_jwk(self) -> dict[str, str]:
        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return okp_jwk("X25519", raw)

    @property
    def signing_jwk(self) -> dict[str, str]:
        raw = self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return okp_jwk("Ed25519", raw)

    def private_bytes(self) -> bytes:
        """The raw X25519 private key, for the HPKE recipient context (never leaves the TD)."""
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
