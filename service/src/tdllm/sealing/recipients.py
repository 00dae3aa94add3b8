"""Recipient key pairs and the JWE that wraps a model's data key to each of them.

A recipient is an X25519 or P-384 key pair. Sealing wraps the 256-bit data key to each
recipient's public key as a compact JWE (ECDH-ES+A256KW key agreement, A256GCM content
encryption, built by jwcrypto); opening unwraps it with the private key. The same JWE shape is
what the key broker returns after attestation (docs/attestation design, 8.3), so a later issue
swaps the key file for the broker without touching the format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

from jwcrypto import jwe, jwk  # type: ignore[import-untyped]
from jwcrypto.common import JWException  # type: ignore[import-untyped]

from tdllm.errors import UsageError
from tdllm_attest.wire import from_b64url

CURVES = {"X25519": "OKP", "P-384": "EC"}
KEY_ALG = "ECDH-ES+A256KW"
CONTENT_ENC = "A256GCM"
CONTENT_TYPE = "tdllm-data-key"
MAX_KEY_FILE_BYTES = 64 << 10


def generate_key_pair(curve: str) -> Any:
    """A fresh recipient key pair (a jwcrypto JWK holding the private key)."""
    if curve not in CURVES:
        raise UsageError(f"unsupported curve {curve!r}; choose one of {', '.join(CURVES)}")
    return jwk.JWK.generate(kty=CURVES[curve], crv=curve)


def thumbprint(key: Any) -> str:
    """RFC 7638 SHA-256 thumbprint of the public key: the recipient's `kid`."""
    return cast(str, key.thumbprint())


def write_key_pair(prefix: Path, curve: str) -> tuple[Path, Path]:
    """Write PREFIX.pub (public JWK) and PREFIX.key (private JWK, mode 0600); never overwrite."""
    key = generate_key_pair(curve)
    pub_path = prefix.with_name(prefix.name + ".pub")
    key_path = prefix.with_name(prefix.name + ".key")
    for path in (pub_path, key_path):
        if path.exists():
            raise UsageError(f"{path} exists; refusing to overwrite a key")
    kid = thumbprint(key)
    private = json.loads(key.export_private())
    public = json.loads(key.export_public())
    # O_EXCL + mode 0600 at creation: the private key is never readable by others, not even
    # between open() and a later chmod
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**private, "kid": kid}, f, indent=2)
            f.write("\n")
        pub_path.write_text(json.dumps({**public, "kid": kid}, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write the key pair at {prefix}: {exc.strerror}") from None
    return pub_path, key_path


def load_public_key(path: Path) -> Any:
    """A recipient public key from a JWK (JSON) or PEM file; a private key file gives its public
    half."""
    key = _load_key(path)
    return jwk.JWK.from_json(key.export_public())


def load_private_key(path: Path) -> Any:
    """The recipient private key (JWK or PEM) that unwraps a sealed model's data key."""
    key = _load_key(path)
    if not key.has_private:
        raise UsageError(f"{path}: is a public key; opening a sealed model needs the private key")
    return key


def _load_key(path: Path) -> Any:
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise ValueError("too large")
        if raw.lstrip().startswith(b"{"):
            key = jwk.JWK.from_json(raw.decode("utf-8"))
        else:
            key = jwk.JWK.from_pem(raw, password=None)
    except (OSError, ValueError, TypeError, JWException) as exc:
        raise UsageError(f"{path}: not a readable JWK or PEM key ({type(exc).__name__})") from None
    params = key.export_public(as_dict=True)
    if CURVES.get(params.get("crv", "")) != params.get("kty"):
        raise UsageError(f"{path}: recipient keys must be X25519 or P-384")
    return key


def wrap_data_key(
    data_key: bytes | bytearray, recipient: Any, model_id: str, key_id: str
) -> dict[str, str]:
    """One recipient entry: the data key as a compact JWE to `recipient`.

    The protected header names the model and key id, so a JWE lifted from another model's
    directory is refused even when its recipient matches.
    """
    kid = thumbprint(recipient)
    header = {
        "alg": KEY_ALG,
        "enc": CONTENT_ENC,
        "kid": kid,
        "cty": CONTENT_TYPE,
        "tdllm_model_id": model_id,
        "tdllm_key_id": key_id,
    }
    token = jwe.JWE(bytes(data_key), protected=json.dumps(header))
    token.add_recipient(recipient)
    return {"kid": kid, "jwe": cast(str, token.serialize(compact=True))}


def unwrap_data_key(entries: list[Any], private_key: Any, model_id: str) -> bytearray:
    """The data key from the entry addressed to `private_key`.

    Raises ValueError for every failure (no entry for this key, failed unwrap, wrong model,
    wrong header); the reader turns that into the one opaque SealedModelError.
    """
    kid = thumbprint(private_key)
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kid") != kid:
            continue
        compact = entry.get("jwe")
        if not isinstance(compact, str) or not _is_canonical_compact(compact):
            continue
        token = jwe.JWE()
        try:
            token.deserialize(compact, key=private_key)
        except (JWException, ValueError, TypeError, KeyError):
            continue
        header = token.jose_header
        payload = bytearray(token.payload)
        if (
            header.get("alg") == KEY_ALG
            and header.get("enc") == CONTENT_ENC
            and header.get("cty") == CONTENT_TYPE
            and header.get("tdllm_model_id") == model_id
            and len(payload) == 32
        ):
            return payload
        payload[:] = bytes(len(payload))
    raise ValueError("no recipient entry opens with this key")


def _is_canonical_compact(token: str) -> bool:
    """Five base64url parts, each in its one canonical encoding (`from_b64url` is strict).

    base64 decoders ignore the unused low bits of the last character, so without this check a
    flipped bit there would decode to the same JWE; the format promises every bit matters.
    """
    parts = token.split(".")
    if len(parts) != 5:
        return False
    for part in parts:
        try:
            from_b64url(part)
        except ValueError:
            return False
    return True
