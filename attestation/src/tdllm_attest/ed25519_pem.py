"""Ed25519 keys from PEM: the one loader for policy signers, the broker's answer key and image
signing keys, so each refuses other key types the same way."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key


def public_key_from_pem(pem: bytes, what: str) -> Ed25519PublicKey:
    """An Ed25519 public key (PEM SubjectPublicKeyInfo); ValueError naming `what` otherwise."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{what} is not an Ed25519 public key")
    return key


def private_key_from_pem(pem: bytes, what: str) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key (PKCS#8 PEM); ValueError naming `what` otherwise."""
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{what} is not an Ed25519 private key")
    return key
