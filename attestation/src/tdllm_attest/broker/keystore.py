"""The broker's keystore: a JSON file of data keys, each AES-256-GCM-wrapped under a KEK.

Each record names the policy its key is released under and the modes ("production",
"simulated") it may be released in. The AAD of the wrap covers key id, policy and modes, so
editing a record's policy or modes in the file makes its key undecryptable (fail closed).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tdllm_attest.broker.protocol import b64url, from_b64url
from tdllm_attest.policy import canonical_json
from tdllm_attest.simulated import MODE_PRODUCTION, MODE_SIMULATED

KEK_SIZE = 32
GCM_NONCE_SIZE = 12
KEYSTORE_VERSION = 1
MODES = frozenset({MODE_PRODUCTION, MODE_SIMULATED})


class KeystoreError(Exception):
    """The keystore or KEK is malformed, or a wrapped key does not decrypt."""


@dataclass(frozen=True)
class KeyRecord:
    """One data key as stored: its name, policy, release modes and the wrapped bytes."""

    key_id: str
    policy: str
    modes: frozenset[str]
    wrapped: bytes

    def aad(self) -> bytes:
        """What the wrap authenticates besides the key itself."""
        return canonical_json(
            {"key_id": self.key_id, "policy": self.policy, "modes": sorted(self.modes)}
        )


def load_kek(path: Path) -> bytes:
    """Read a 32-byte key-encryption key (raw bytes) from `path`."""
    try:
        kek = path.read_bytes()
    except OSError as exc:
        raise KeystoreError(f"cannot read KEK {path}: {exc}") from None
    if len(kek) != KEK_SIZE:
        raise KeystoreError(f"KEK {path} is {len(kek)} bytes, want {KEK_SIZE}")
    return kek


class Keystore:
    """Key records by id; `unwrap` decrypts one data key when the broker releases it."""

    def __init__(self, records: Iterable[KeyRecord], kek: bytes) -> None:
        if len(kek) != KEK_SIZE:
            raise KeystoreError(f"KEK must be {KEK_SIZE} bytes")
        self._aead = AESGCM(kek)
        self._records = {r.key_id: r for r in records}

    def get(self, key_id: str) -> KeyRecord | None:
        """The record for `key_id`, or None."""
        return self._records.get(key_id)

    def unwrap(self, record: KeyRecord) -> bytes:
        """Decrypt the data key of `record` (AES-GCM; any tampering fails)."""
        nonce, ciphertext = record.wrapped[:GCM_NONCE_SIZE], record.wrapped[GCM_NONCE_SIZE:]
        try:
            return self._aead.decrypt(nonce, ciphertext, record.aad())
        except InvalidTag:
            raise KeystoreError(f"key {record.key_id!r} does not decrypt under the KEK") from None

    def wrap(self, key_id: str, policy: str, modes: Iterable[str], data_key: bytes) -> KeyRecord:
        """Wrap `data_key` into a new record and add it (used by admin tools and tests)."""
        modes = frozenset(modes)
        if not modes or not modes <= MODES:
            raise KeystoreError(f"modes must be a non-empty subset of {sorted(MODES)}")
        draft = KeyRecord(key_id, policy, modes, b"")
        nonce = secrets.token_bytes(GCM_NONCE_SIZE)
        record = KeyRecord(
            key_id, policy, modes, nonce + self._aead.encrypt(nonce, data_key, draft.aad())
        )
        self._records[key_id] = record
        return record

    def to_json(self) -> str:
        """The keystore file text (wrapped keys only; no plaintext, no KEK)."""
        return json.dumps(
            {
                "version": KEYSTORE_VERSION,
                "keys": [
                    {
                        "key_id": r.key_id,
                        "policy": r.policy,
                        "modes": sorted(r.modes),
                        "wrapped": b64url(r.wrapped),
                    }
                    for r in self._records.values()
                ],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, kek: bytes) -> Keystore:
        """Parse a keystore file; every record is checked for shape, not yet decrypted."""
        try:
            doc = json.loads(text)
            if doc["version"] != KEYSTORE_VERSION:
                raise KeystoreError(f"keystore version {doc['version']!r} is not supported")
            records = [
                KeyRecord(
                    key_id=str(k["key_id"]),
                    policy=str(k["policy"]),
                    modes=frozenset(str(m) for m in k["modes"]),
                    wrapped=from_b64url(k["wrapped"]),
                )
                for k in doc["keys"]
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeystoreError(f"keystore is malformed: {exc}") from None
        for r in records:
            if not r.modes or not r.modes <= MODES:
                raise KeystoreError(f"key {r.key_id!r} has invalid modes {sorted(r.modes)}")
        return cls(records, kek)

    @classmethod
    def load(cls, path: Path, kek: bytes) -> Keystore:
        """Read a keystore file."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeystoreError(f"cannot read keystore {path}: {exc}") from None
        return cls.from_json(text, kek)
