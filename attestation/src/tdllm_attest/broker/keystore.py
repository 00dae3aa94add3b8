"""The broker's keystore: a JSON file of data keys, each AES-256-GCM-wrapped under a KEK.

Each record names the policy its key is released under, the modes ("production", "simulated")
it may be released in, and the model and version its key unlocks (the TD refuses a key for any
other model or version than its sealed manifest's; the policy may set a minimum version). The
AAD of the wrap covers key id, policy, modes, model and version, so editing any of them in the
file makes the key undecryptable (fail closed).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tdllm_attest.model_identity import valid_model_name, valid_model_version
from tdllm_attest.trust import MODE_PRODUCTION, MODE_SIMULATED
from tdllm_attest.wire import b64url, canonical_json, from_b64url

KEK_SIZE = 32
GCM_NONCE_SIZE = 12
# 2: records carry model and version (in the AAD). Version 1 files are refused: their keys are
# bound to no model, so nothing could tell the TD which model or version they unlock.
KEYSTORE_VERSION = 2
MODES = frozenset({MODE_PRODUCTION, MODE_SIMULATED})


class KeystoreError(Exception):
    """The keystore or KEK is malformed, or a wrapped key does not decrypt."""


@dataclass(frozen=True)
class KeyRecord:
    """One data key as stored: its name, policy, release modes, the model and version it
    unlocks, and the wrapped bytes."""

    key_id: str
    policy: str
    modes: frozenset[str]
    model: str
    version: int
    wrapped: bytes

    def aad(self) -> bytes:
        """What the wrap authenticates besides the key itself."""
        return canonical_json(
            {
                "key_id": self.key_id,
                "policy": self.policy,
                "modes": sorted(self.modes),
                "model": self.model,
                "version": self.version,
            }
        )

    def check(self) -> None:
        """Raise `KeystoreError` if modes, model or version are not usable."""
        if not self.modes or not self.modes <= MODES:
            raise KeystoreError(f"key {self.key_id!r} has invalid modes {sorted(self.modes)}")
        if not valid_model_name(self.model):
            raise KeystoreError(f"key {self.key_id!r}: model must be 1..200 printable characters")
        if not valid_model_version(self.version):
            raise KeystoreError(f"key {self.key_id!r}: version must be an integer >= 1")


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

    def wrap(
        self,
        key_id: str,
        policy: str,
        modes: Iterable[str],
        data_key: bytes,
        *,
        model: str,
        version: int,
    ) -> KeyRecord:
        """Wrap `data_key` (the key of `model` at `version`) into a new record and add it
        (used by admin tools and tests)."""
        draft = KeyRecord(key_id, policy, frozenset(modes), model, version, b"")
        draft.check()
        nonce = secrets.token_bytes(GCM_NONCE_SIZE)
        wrapped = nonce + self._aead.encrypt(nonce, data_key, draft.aad())
        record = dataclasses.replace(draft, wrapped=wrapped)
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
                        "model": r.model,
                        "version": r.version,
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
            if doc["version"] == 1:
                raise KeystoreError(
                    "keystore version 1 binds its keys to no model and version: wrap each key "
                    "again with its model and version (Keystore.wrap(..., model=, version=))"
                )
            if doc["version"] != KEYSTORE_VERSION:
                raise KeystoreError(f"keystore version {doc['version']!r} is not supported")
            records = [
                KeyRecord(
                    key_id=str(k["key_id"]),
                    policy=str(k["policy"]),
                    modes=frozenset(str(m) for m in k["modes"]),
                    model=k["model"],
                    version=k["version"],
                    wrapped=from_b64url(k["wrapped"]),
                )
                for k in doc["keys"]
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeystoreError(f"keystore is malformed: {exc}") from None
        for r in records:
            r.check()
        return cls(records, kek)

    @classmethod
    def load(cls, path: Path, kek: bytes) -> Keystore:
        """Read a keystore file."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeystoreError(f"cannot read keystore {path}: {exc}") from None
        return cls.from_json(text, kek)
