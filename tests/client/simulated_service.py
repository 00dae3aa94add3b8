"""/v1/attestation answers as a service on a simulated TD gives them, without the service.

The SDK tests need no engine and no torch: this stands in for `tdllm.api.attestation` (same
document, same REPORTDATA binding), with the collateral the host would serve as a parameter, and
for `tdllm.api.receipts` (`receipt_fields`: the receipt such a TD signs for BODY to REQUEST).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest.client.binding import ServiceClaims, attestation_answer, okp_jwk, report_data
from tdllm_attest.client.receipt_protocol import format_time
from tdllm_attest.gpu.binding import gpu_nonce
from tdllm_attest.gpu.evidence import evidence_digest
from tdllm_attest.testing.gpu import SyntheticGpu
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_attest.wire import from_b64url

MODEL = {"id": "simulated-model", "sealed": None}
NOW = datetime.now(UTC)
REQUEST = b'{"model":"simulated-model","messages":[{"role":"user","content":"Hi"}]}'
BODY: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "simulated-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
}


def _raw(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class SimulatedService:
    """A TD measured as `fields` on `platform`, with its two ephemeral keys and its claims."""

    platform: SimulatedTdxPlatform
    fields: SyntheticTdFields = field(default_factory=SyntheticTdFields)
    claims: ServiceClaims = field(default_factory=lambda: ServiceClaims("td-only", MODEL, None))
    key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    signing_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    gpus: tuple[SyntheticGpu, ...] = ()  # gpu-cc: evidence of these, made for each nonce

    def answer(self, nonce: str, *, collateral: str | None) -> dict[str, Any]:
        """The /v1/attestation document for `nonce`, carrying `collateral` as the host served it."""
        public_jwk = okp_jwk("X25519", _raw(self.key))
        signing_jwk = okp_jwk("Ed25519", _raw(self.signing_key))
        claims, evidence = self.claims, None
        if self.gpus:
            made = [gpu.collect(gpu_nonce(bytes.fromhex(nonce))) for gpu in self.gpus]
            claims = dataclasses.replace(claims, gpu={"evidence_sha256": evidence_digest(made)})
            evidence = [e.to_json() for e in made]
        data = report_data(nonce, public_jwk, signing_jwk, claims)
        quote = SimulatedProvider(self.platform, self.fields).get_quote(data)
        return attestation_answer(
            nonce=nonce,
            public_jwk=public_jwk,
            signing_jwk=signing_jwk,
            claims=claims,
            quote=quote,
            collateral=collateral,
            event_log=None,
            simulated=True,
            gpu_evidence=evidence,
        )


def receipt_fields(
    document: dict[str, Any], response_sha256: str, **changes: Any
) -> dict[str, Any]:
    """The receipt of BODY to REQUEST as the TD of `document` would sign it, and `changes`."""
    quote = document["quote"]
    receipt = {
        "schema": "tdllm-receipt/1",
        "time": format_time(NOW),
        "endpoint": "/v1/chat/completions",
        "stream": False,
        "request_sha256": hashlib.sha256(REQUEST).hexdigest(),
        "response_sha256": response_sha256,
        "sampling": {
            "max_tokens": 8,
            "n": 1,
            "seed": None,
            "stop": [],
            "temperature": "0.0",
            "top_k": 0,
            "top_p": "1.0",
        },
        "model": document["model"],
        "profile": document["profile"],
        "reference_values_id": document["reference_values_id"],
        "attestation": {
            "quote_sha256": hashlib.sha256(from_b64url(quote)).hexdigest(),
            "tcb_status": "UpToDate",
        },
    }
    return receipt | changes
