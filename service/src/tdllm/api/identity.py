"""The service's ephemeral key pair and how a quote binds it to a client's nonce.

The key pair (X25519) is generated in memory at start and never stored: a restart gets a new
one, so a key seen in an attestation belongs to exactly one boot of one TD. It is the key the
end-to-end encrypted mode will encrypt requests to; /v1/attestation proves it lives in the TD:

    REPORTDATA = SHA-512(b"tdllm-api-attest/1\\0" || canonical_json({
        "nonce": <the client's nonce, lowercase hex>,
        "service_public_key": {"kty": "OKP", "crv": "X25519", "x": <base64url, unpadded>}}))

canonical_json is sorted keys, no whitespace, UTF-8 (the same as the key-broker protocol).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest.broker.protocol import b64url

ATTEST_PROTOCOL = "tdllm-api-attest/1"
DOMAIN_TAG = ATTEST_PROTOCOL.encode() + b"\x00"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def report_data(nonce_hex: str, public_jwk: dict[str, str]) -> bytes:
    """The 64 REPORTDATA bytes for a client nonce and the service key (see module docstring)."""
    document = {"nonce": nonce_hex, "service_public_key": public_jwk}
    return hashlib.sha512(DOMAIN_TAG + canonical_json(document)).digest()


@dataclass
class ServiceIdentity:
    private_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)

    @property
    def public_jwk(self) -> dict[str, str]:
        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "X25519", "x": b64url(raw)}
