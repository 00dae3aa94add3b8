"""The service's ephemeral keys and how a quote binds them, and what the service claims, to a
client's nonce.

Two key pairs are generated in memory at start and never stored, so keys seen in an attestation
belong to exactly one boot of one TD: an X25519 key the end-to-end encrypted mode encrypts
requests to, and an Ed25519 key that signs every end-to-end answer (X25519 cannot sign).
/v1/attestation proves both live in the TD, and binds what the service says about itself, so a
host cannot serve other claims next to a genuine quote:

    REPORTDATA = SHA-512(b"tdllm-api-attest/3\\0" || canonical_json({
        "model": null | {
            "id": <the served model id, as /v1/models lists it>,
            "sealed": null | {
                "format": <the sealed format version, "tdllm-sealed/1">,
                "manifest_sha256": <hex SHA-256 of canonical_json(the MAC-covered manifest)>,
                "model_id": <the sealed manifest's model_id, 32 hex>}},
        "nonce": <the client's nonce, lowercase hex>,
        "profile": <the protection profile: "td-only" | "split" | "masked" | "obfuscated">,
        "reference_values_id": <the reference_values_id setting, or null>,
        "service_public_key": {"kty": "OKP", "crv": "X25519", "x": <base64url, unpadded>},
        "signing_public_key": {"kty": "OKP", "crv": "Ed25519", "x": <base64url, unpadded>}}))

canonical_json is sorted keys, no whitespace, UTF-8 (the same as the key-broker protocol).
`model` is null until the engine runs. `sealed` is null for a plain (dev) model: its bytes come
from the host's disk unauthenticated, so there is nothing of it worth binding but its name.
For a sealed model the identity is read at boot around the unsealing (`sealed_model_identity`),
never later from a disk the host may have changed since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
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

ATTEST_PROTOCOL = "tdllm-api-attest/3"
DOMAIN_TAG = ATTEST_PROTOCOL.encode() + b"\x00"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def okp_jwk(crv: str, raw: bytes) -> dict[str, str]:
    return {"kty": "OKP", "crv": crv, "x": b64url(raw)}


@dataclass(frozen=True)
class ServiceClaims:
    """What the service says about itself next to its keys; REPORTDATA binds all of it."""

    profile: str
    model: dict[str, Any] | None
    reference_values_id: str | None


def bound_document(
    nonce_hex: str, public_jwk: dict[str, str], signing_jwk: dict[str, str], claims: ServiceClaims
) -> dict[str, Any]:
    """The document whose hash is REPORTDATA (see module docstring)."""
    return {
        "model": claims.model,
        "nonce": nonce_hex,
        "profile": claims.profile,
        "reference_values_id": claims.reference_values_id,
        "service_public_key": public_jwk,
        "signing_public_key": signing_jwk,
    }


def report_data(
    nonce_hex: str, public_jwk: dict[str, str], signing_jwk: dict[str, str], claims: ServiceClaims
) -> bytes:
    """The 64 REPORTDATA bytes for a client nonce, the service keys and its claims."""
    document = bound_document(nonce_hex, public_jwk, signing_jwk, claims)
    return hashlib.sha512(DOMAIN_TAG + canonical_json(document)).digest()


def sealed_model_identity(path: Path) -> dict[str, str]:
    """Format, model id and manifest digest of the sealed model in `path`, as on disk now.

    Boot reads this before and after unsealing and keeps it only when both agree, so it names
    the manifest whose MAC the unsealing verified.
    """
    from tdllm.sealing import format as fmt  # torch: only the service's boot gets here

    document = json.loads((path / fmt.MANIFEST_NAME).read_bytes().decode("utf-8"))
    manifest = document["manifest"]
    return {
        "format": str(document["format"]),
        "manifest_sha256": hashlib.sha256(fmt.canonical_json(manifest)).hexdigest(),
        "model_id": str(manifest["model_id"]),
    }


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
