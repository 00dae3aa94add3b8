"""The wire form of one GPU's evidence: the SPDM report and its device certificate chain.

`GpuEvidence.to_json` / `from_json` are the JSON the broker and the client exchange; `from_json`
is strict (exact keys, types and sizes) because the input comes from the untrusted host.
`evidence_digest` is the one hash of a list of evidences that is bound into other documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest.errors import GpuEvidenceError
from tdllm_attest.wire import b64url, canonical_json, from_b64url

ARCH_HOPPER = "HOPPER"
SUPPORTED_ARCHS = frozenset({ARCH_HOPPER})
MAX_REPORT_SIZE = 64 * 1024
MAX_CHAIN_LENGTH = 8
MAX_CERTIFICATE_SIZE = 16 * 1024
EVIDENCE_DIGEST_DOMAIN = b"tdllm-gpu-evidence/1\0"
_KEYS = frozenset({"arch", "report", "certificate_chain"})


@dataclass(frozen=True)
class GpuEvidence:
    """One GPU's attestation report (SPDM request||response) and its DER chain, leaf first."""

    arch: str
    report: bytes
    certificate_chain: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise GpuEvidenceError(f"GPU architecture {self.arch!r} is not supported (HOPPER only)")
        if not isinstance(self.report, bytes) or not 0 < len(self.report) <= MAX_REPORT_SIZE:
            raise GpuEvidenceError(f"GPU report must be 1..{MAX_REPORT_SIZE} bytes")
        chain = self.certificate_chain
        if not isinstance(chain, tuple) or not 0 < len(chain) <= MAX_CHAIN_LENGTH:
            raise GpuEvidenceError(f"GPU certificate chain must hold 1..{MAX_CHAIN_LENGTH} certs")
        for der in chain:
            if not isinstance(der, bytes) or not 0 < len(der) <= MAX_CERTIFICATE_SIZE:
                raise GpuEvidenceError(
                    f"GPU certificate must be 1..{MAX_CERTIFICATE_SIZE} bytes of DER"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "report": b64url(self.report),
            "certificate_chain": [b64url(der) for der in self.certificate_chain],
        }

    @classmethod
    def from_json(cls, obj: object) -> GpuEvidence:
        """Parse the JSON form; anything but exactly the documented shape is refused."""
        if not isinstance(obj, Mapping) or set(obj) != _KEYS:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise GpuEvidenceError(f"GPU evidence must have exactly {sorted(_KEYS)}, got {keys}")
        arch, report, chain = obj["arch"], obj["report"], obj["certificate_chain"]
        if not isinstance(arch, str) or not isinstance(report, str) or not isinstance(chain, list):
            raise GpuEvidenceError("GPU evidence: arch and report must be strings, chain a list")
        # Size caps before decoding: base64 text is 4/3 of its bytes.
        if len(report) > (MAX_REPORT_SIZE * 4 + 2) // 3:
            raise GpuEvidenceError(f"GPU report exceeds {MAX_REPORT_SIZE} bytes")
        if len(chain) > MAX_CHAIN_LENGTH:
            raise GpuEvidenceError(f"GPU certificate chain exceeds {MAX_CHAIN_LENGTH} certificates")
        if not all(isinstance(c, str) for c in chain):
            raise GpuEvidenceError("GPU certificate chain entries must be strings")
        try:
            return cls(
                arch=arch,
                report=from_b64url(report),
                certificate_chain=tuple(from_b64url(c) for c in chain),
            )
        except ValueError as exc:
            raise GpuEvidenceError(f"GPU evidence: {exc}") from None


def evidence_digest(evidences: Sequence[GpuEvidence]) -> str:
    """Hex SHA-256 of the domain tag and the canonical JSON of every evidence, in order."""
    body = canonical_json([e.to_json() for e in evidences])
    return hashlib.sha256(EVIDENCE_DIGEST_DOMAIN + body).hexdigest()


def load_recorded_chain(pem_text: str | bytes) -> tuple[bytes, ...]:
    """DER certificates, in file order, of a PEM bundle (NVIDIA's recorded chains: leaf first)."""
    data = pem_text.encode() if isinstance(pem_text, str) else pem_text
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise GpuEvidenceError(f"not a PEM certificate bundle: {exc}") from None
    return tuple(c.public_bytes(Encoding.DER) for c in certs)
