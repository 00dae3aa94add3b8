"""The broker's answer signature: the TD pins the broker's Ed25519 public key in its image.

The TD reaches the broker over the host's network, so without this the host could run its own
"broker", take the TD's genuine quote and hand back a key of its choosing for a model it sealed
itself. Every attest answer therefore carries an Ed25519 signature over

    canonical_json({"protocol", "session_id", "key_id", "tee_pubkey", "jwe", "model", "version"})

and the in-TD client checks it against the pinned key before it touches the JWE. `tee_pubkey`
(the TD's fresh ephemeral key) makes a recorded answer useless in any other exchange. An answer
that certifies a cluster node adds `cluster` ({"certificate", "ca"}: PEM text) to the signed
document, so the host cannot swap in a CA of its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tdllm_attest.broker.protocol import PROTOCOL
from tdllm_attest.ed25519_pem import private_key_from_pem, public_key_from_pem
from tdllm_attest.wire import b64url, canonical_json, from_b64url

SIGNATURE_ALG = "Ed25519"


class AnswerSignatureError(Exception):
    """The answer is unsigned, signed by another key, or its signed fields do not match."""


def signed_answer(
    *,
    session_id: str,
    key_id: str,
    tee_pubkey: dict[str, str],
    jwe: str,
    model: str,
    version: int,
    cluster: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The document whose canonical JSON the broker signs (see module docstring)."""
    document: dict[str, Any] = {
        "protocol": PROTOCOL,
        "session_id": session_id,
        "key_id": key_id,
        "tee_pubkey": dict(tee_pubkey),
        "jwe": jwe,
        "model": model,
        "version": version,
    }
    if cluster is not None:
        document["cluster"] = dict(cluster)
    return document


def sign_answer(key: Ed25519PrivateKey, document: dict[str, Any]) -> dict[str, str]:
    """The `signature` member of an attest answer."""
    return {"alg": SIGNATURE_ALG, "value": b64url(key.sign(canonical_json(document)))}


def verify_answer(key: Ed25519PublicKey, document: dict[str, Any], signature: object) -> None:
    """Raise `AnswerSignatureError` unless `signature` is the pinned key's over `document`."""
    if not isinstance(signature, dict) or set(signature) != {"alg", "value"}:
        raise AnswerSignatureError("the broker's answer is not signed")
    if signature["alg"] != SIGNATURE_ALG:
        raise AnswerSignatureError(f"the broker's answer is signed with {signature['alg']!r}")
    try:
        key.verify(from_b64url(signature["value"]), canonical_json(document))
    except (InvalidSignature, ValueError, TypeError):
        raise AnswerSignatureError(
            "the broker's answer is not signed by the pinned broker key (an impostor broker?)"
        ) from None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The broker's Ed25519 private key (PKCS#8 PEM, unencrypted)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the broker signing key {path}: {exc}") from None
    return private_key_from_pem(pem, f"the broker signing key {path}")


def load_broker_public_key(pem: bytes) -> Ed25519PublicKey:
    """The pinned broker public key (PEM SubjectPublicKeyInfo, Ed25519)."""
    return public_key_from_pem(pem, "the broker public key")


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of `key`'s public half: what the image pins."""
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def write_signing_key_pair(prefix: Path) -> tuple[Path, Path]:
    """PREFIX.key.pem (private, PKCS#8, mode 0600, never overwritten) and PREFIX.pub.pem."""
    key = Ed25519PrivateKey.generate()
    private_path = prefix.with_name(prefix.name + ".key.pem")
    public_path = prefix.with_name(prefix.name + ".pub.pem")
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # O_EXCL + 0600 at creation: the private key is never readable by others, not even briefly
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(public_pem(key))
    return private_path, public_path
