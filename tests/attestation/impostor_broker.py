"""The host's own "broker": it answers the TD's challenge, takes the genuine quote and hands back
a key of its choosing (for a model it sealed itself), signed by its own key or not at all."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm_attest.broker.protocol import HASH_ALG, PATH_ATTEST, PATH_CHALLENGE
from tdllm_attest.broker.signing import sign_answer, signed_answer
from tdllm_attest.broker.wrapping import encrypt_to_tee, tee_public_key
from tdllm_attest.wire import b64url


@dataclass
class ImpostorTransport:
    """A key client `Transport` that never reaches the owner's broker."""

    data_key: bytes
    model: str
    version: int
    # None: an unsigned answer; otherwise the impostor signs with a key the TD does not pin
    signing_key: Ed25519PrivateKey | None = None
    quotes: list[str] = field(default_factory=list)  # the genuine quotes it was handed

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path == PATH_CHALLENGE:
            challenge = {
                "session_id": b64url(secrets.token_bytes(16)),
                "nonce": b64url(secrets.token_bytes(32)),
                "expires_at": 0,
                "hash_alg": HASH_ALG,
            }
            return 200, challenge
        assert path == PATH_ATTEST
        self.quotes.append(body["quote"])
        runtime = body["runtime_data"]
        jwe = encrypt_to_tee(
            self.data_key,
            tee_public_key(runtime["tee_pubkey"]),
            key_id=runtime["key_id"],
            session_id=runtime["session_id"],
            model=self.model,
            version=self.version,
        )
        answer: dict[str, Any] = {
            "key_id": runtime["key_id"],
            "jwe": jwe,
            "model": self.model,
            "version": self.version,
            "result": {},
        }
        if self.signing_key is not None:
            document = signed_answer(
                session_id=runtime["session_id"],
                key_id=runtime["key_id"],
                tee_pubkey=runtime["tee_pubkey"],
                jwe=jwe,
                model=self.model,
                version=self.version,
            )
            answer["signature"] = sign_answer(self.signing_key, document)
        return 200, answer
