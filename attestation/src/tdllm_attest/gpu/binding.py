"""How GPU evidence is tied to a TDX quote (both protocols, both sides).

The GPU signs the 32-byte nonce of its SPDM GET_MEASUREMENTS request. That nonce is derived from
the nonce the verifier chose (the broker's session nonce, a client's /v1/attestation nonce):

    gpu_nonce = SHA-256(b"tdllm-gpu-nonce/1\\0" || nonce bytes)

(the key broker's session nonce is base64url text, a client's /v1/attestation nonce hex text:
both sides hash the bytes the text stands for)

so GPU evidence is as fresh as the quote beside it, and evidence made for one verifier cannot
be shown to another. The evidence itself is then bound into the quote's REPORTDATA through its
digest (`tdllm_attest.gpu.evidence.evidence_digest`): a host cannot pair a genuine quote with
evidence of another GPU, nor strip the evidence from the answer.
"""

from __future__ import annotations

import hashlib

GPU_NONCE_TAG = b"tdllm-gpu-nonce/1\x00"


def gpu_nonce(nonce: bytes) -> bytes:
    """The 32-byte SPDM nonce for the bytes of a verifier's nonce."""
    return hashlib.sha256(GPU_NONCE_TAG + nonce).digest()
