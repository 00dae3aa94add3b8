"""Wire format of `tdllm-kb/1`, shared by the broker and the in-TD client.

REPORTDATA = SHA-512(b"tdllm-kb/1\\0" || canonical_json(runtime_data)), all 64 bytes used, where
runtime_data = {protocol, session_id, nonce, key_id, tee_pubkey (public JWK)}, plus
gpu_evidence_sha256 when the TD sends GPU evidence (the gpu-cc profile) and cluster_csr_sha256 when
it asks for a node certificate (a cluster node; docs/attestation.md).
"""

from __future__ import annotations

import hashlib
from typing import Any

from tdllm_attest.wire import canonical_json

PROTOCOL = "tdllm-kb/1"
DOMAIN_TAG = PROTOCOL.encode() + b"\x00"
HASH_ALG = "sha512"
JWE_ALG = "ECDH-ES+A256KW"
JWE_ENC = "A256GCM"
NONCE_SIZE = 32
SESSION_ID_SIZE = 16
RUNTIME_DATA_KEYS = frozenset({"protocol", "session_id", "nonce", "key_id", "tee_pubkey"})
# binds the attest request's `gpu_evidence` (tdllm_attest.gpu.evidence.evidence_digest)
GPU_EVIDENCE_KEY = "gpu_evidence_sha256"
# binds the attest request's `cluster_csr` (tdllm_attest.cluster.identity.csr_digest)
CLUSTER_CSR_KEY = "cluster_csr_sha256"
OPTIONAL_RUNTIME_DATA_KEYS = frozenset({GPU_EVIDENCE_KEY, CLUSTER_CSR_KEY})
# Ephemeral TD keys the broker will encrypt to: (kty, crv) -> the JWK members allowed.
ALLOWED_TEE_KEYS: dict[tuple[str, str], frozenset[str]] = {
    ("OKP", "X25519"): frozenset({"kty", "crv", "x"}),
    ("EC", "P-384"): frozenset({"kty", "crv", "x", "y"}),
}

PATH_CHALLENGE = "/v1/challenge"
PATH_ATTEST = "/v1/attest"
PATH_CLUSTER_NODES = "/v1/cluster/nodes"  # GET ?key_id=K: the node certificates issued under K
PROBLEM_CONTENT_TYPE = "application/problem+json"
ERROR_TYPE_PREFIX = "urn:tdllm:kb:error:"


def runtime_data(
    *,
    session_id: str,
    nonce: str,
    key_id: str,
    tee_pubkey: dict[str, str],
    gpu_evidence_sha256: str | None = None,
    cluster_csr_sha256: str | None = None,
) -> dict[str, Any]:
    """The runtime data object the TD binds into REPORTDATA."""
    runtime: dict[str, Any] = {
        "protocol": PROTOCOL,
        "session_id": session_id,
        "nonce": nonce,
        "key_id": key_id,
        "tee_pubkey": dict(tee_pubkey),
    }
    if gpu_evidence_sha256 is not None:
        runtime[GPU_EVIDENCE_KEY] = gpu_evidence_sha256
    if cluster_csr_sha256 is not None:
        runtime[CLUSTER_CSR_KEY] = cluster_csr_sha256
    return runtime


def report_data_for(runtime: dict[str, Any]) -> bytes:
    """The 64 REPORTDATA bytes that bind `runtime` (domain-separated SHA-512)."""
    return hashlib.sha512(DOMAIN_TAG + canonical_json(runtime)).digest()
