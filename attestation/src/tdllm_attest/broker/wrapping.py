"""The data key on the wire: a compact JWE (ECDH-ES+A256KW, A256GCM) to the TD's ephemeral key.

The protected header (authenticated by the JWE's GCM tag) names the key id, the session, and the
model and version the key unlocks (`tdllm_model`, `tdllm_version`), so the TD can hold the key
to its sealed manifest.
"""

from __future__ import annotations

import json
from typing import Any

from jwcrypto import jwe, jwk  # type: ignore[import-untyped]
from jwcrypto.common import JWException  # type: ignore[import-untyped]

from tdllm_attest.broker.protocol import ALLOWED_TEE_KEYS, JWE_ALG, JWE_ENC


class UnwrapError(Exception):
    """The JWE is not for us, was tampered with, or uses another algorithm."""


def tee_public_key(jwk_doc: object) -> Any:
    """Parse the TD's ephemeral public JWK; only X25519 / P-384 public keys are accepted."""
    if not isinstance(jwk_doc, dict) or not all(isinstance(v, str) for v in jwk_doc.values()):
        raise ValueError("tee_pubkey is not a JWK object of strings")
    allowed = ALLOWED_TEE_KEYS.get((jwk_doc.get("kty", ""), jwk_doc.get("crv", "")))
    if allowed is None or set(jwk_doc) != allowed:
        raise ValueError("tee_pubkey must be a public X25519 or P-384 JWK with no other members")
    try:
        key = jwk.JWK(**jwk_doc)
    except (JWException, ValueError, TypeError) as exc:
        raise ValueError(f"tee_pubkey is not a valid key: {exc}") from None
    if key.has_private:
        raise ValueError("tee_pubkey carries private key material")
    return key


def encrypt_to_tee(
    data_key: bytes, tee_pubkey: Any, *, key_id: str, session_id: str, model: str, version: int
) -> str:
    """Compact JWE of `data_key` to `tee_pubkey`; kid, session_id, model and version are in the
    protected header."""
    header = {
        "alg": JWE_ALG,
        "enc": JWE_ENC,
        "kid": key_id,
        "session_id": session_id,
        "tdllm_model": model,
        "tdllm_version": version,
    }
    token = jwe.JWE(data_key, protected=json.dumps(header))
    token.add_recipient(tee_pubkey)
    return str(token.serialize(compact=True))


def decrypt_from_broker(
    compact: str, private_key: Any, *, key_id: str, session_id: str, model: str, version: int
) -> bytes:
    """Decrypt with the ephemeral key; only our alg/enc, and kid, session_id, model and version
    must be the expected ones."""
    token = jwe.JWE(algs=[JWE_ALG, JWE_ENC])
    try:
        token.deserialize(compact, key=private_key)
    except (JWException, ValueError, TypeError) as exc:
        raise UnwrapError(f"JWE does not decrypt with the ephemeral key: {exc}") from None
    header = token.jose_header
    if header.get("alg") != JWE_ALG or header.get("enc") != JWE_ENC:
        raise UnwrapError(f"JWE uses {header.get('alg')}/{header.get('enc')}, not ours")
    if header.get("kid") != key_id or header.get("session_id") != session_id:
        raise UnwrapError("JWE kid/session_id do not match the request")
    found = (header.get("tdllm_model"), header.get("tdllm_version"))
    if found != (model, version) or type(found[1]) is not int:
        raise UnwrapError(f"JWE is for {found!r}, the signed answer says {(model, version)!r}")
    return bytes(token.payload)
