"""The service's ephemeral keys.

Two key pairs are generated in memory at start and never stored, so keys seen in an attestation
belong to exactly one boot of one TD: an X25519 key the end-to-end encrypted mode encrypts
requests to, and an Ed25519 key that signs every end-to-end answer (X25519 cannot sign).
/v1/attestation proves both live in the TD and binds what the service says about itself
(`tdllm_attest.client.binding`, which clients recompute).

`sealed` in the bound model claim is null for a plain (dev) model: its bytes come from the
host's disk unauthenticated, so there is nothing of it worth binding but its name. For a sealed
model it is the identity of the manifest whose MAC the unsealing verified (`Checkpoint.identity`),
never read again from a disk the host may have changed since.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tdllm_attest.client.binding import okp_jwk


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
