"""What a service attestation's REPORTDATA binds (tdllm-api-attest/3): computed by the service
when it asks for a quote, recomputed by every client that checks one.

The service holds two ephemeral key pairs (X25519 for requests, Ed25519 for signing answers) and
makes claims about itself; a quote binds both, and the claims, to the client's nonce, so a host
cannot serve other keys or claims next to a genuine quote:

    REPORTDATA = SHA-512(b"tdllm-api-attest/3\\0" || canonical_json({
        "model": null | {
            "id": <the served model id, as /v1/models lists it>,
            "sealed": null | {
                "format": <"tdllm-sealed/1", or "tdllm-sealed/2" with quantized tensors>,
                "manifest_sha256": <hex SHA-256 of canonical_json(the MAC-covered manifest)>,
                "model_id": <the sealed manifest's model_id, 32 hex>}},
        "nonce": <the client's nonce, lowercase hex>,
        "profile": <the protection profile: "td-only" | "split" | "masked" | "obfuscated">,
        "reference_values_id": <the reference_values_id setting, or null>,
        "service_public_key": {"kty": "OKP", "crv": "X25519", "x": <base64url, unpadded>},
        "signing_public_key": {"kty": "OKP", "crv": "Ed25519", "x": <base64url, unpadded>},
        "gpu": {"evidence_sha256": <hex tdllm_attest.gpu.evidence.evidence_digest>}}))

where `gpu` is present only in the gpu-cc profile (absent, not null, elsewhere, so the
REPORTDATA of every other profile is what it was): the evidence of the TD's
confidential-computing GPUs, made for this nonce (`tdllm_attest.gpu.binding.gpu_nonce`) and
served beside the quote as `gpu_evidence`.

with `tdllm_attest.wire.canonical_json` (the key-broker protocol's too). `model` is null until
the service's engine runs. (`tdllm_attest.binding` is the generic constant-time comparison of
REPORTDATA with an expected value, for `tdllm-verify --report-data`.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tdllm_attest.wire import b64url, canonical_json

ATTEST_PROTOCOL = "tdllm-api-attest/3"
DOMAIN_TAG = ATTEST_PROTOCOL.encode() + b"\x00"


def okp_jwk(crv: str, raw: bytes) -> dict[str, str]:
    """The public JWK of a raw X25519 / Ed25519 key, as the attestation serves and binds it."""
    return {"kty": "OKP", "crv": crv, "x": b64url(raw)}


@dataclass(frozen=True)
class ServiceClaims:
    """What the service says about itself next to its keys; REPORTDATA binds all of it."""

    profile: str
    model: dict[str, Any] | None
    reference_values_id: str | None
    # gpu-cc: {"evidence_sha256": hex} of the GPU evidence served with the quote; else None
    gpu: dict[str, str] | None = None


def bound_document(
    nonce_hex: str, public_jwk: dict[str, str], signing_jwk: dict[str, str], claims: ServiceClaims
) -> dict[str, Any]:
    """The document whose hash is REPORTDATA (see module docstring)."""
    document: dict[str, Any] = {
        "model": claims.model,
        "nonce": nonce_hex,
        "profile": claims.profile,
        "reference_values_id": claims.reference_values_id,
        "service_public_key": public_jwk,
        "signing_public_key": signing_jwk,
    }
    if claims.gpu is not None:
        document["gpu"] = claims.gpu
    return document


def report_data(
    nonce_hex: str, public_jwk: dict[str, str], signing_jwk: dict[str, str], claims: ServiceClaims
) -> bytes:
    """The 64 REPORTDATA bytes for a client nonce, the service keys and its claims.

    ValueError when the claims hold a value canonical JSON refuses (NaN, infinities).
    """
    document = bound_document(nonce_hex, public_jwk, signing_jwk, claims)
    return hashlib.sha512(DOMAIN_TAG + canonical_json(document)).digest()


def attestation_answer(
    *,
    nonce: str,
    public_jwk: dict[str, str],
    signing_jwk: dict[str, str],
    claims: ServiceClaims,
    quote: bytes,
    collateral: str | None,
    event_log: str | None,
    simulated: bool,
    gpu_evidence: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The /v1/attestation answer (docs/api.md): what a client reads, in the order it reads it."""
    body: dict[str, Any] = {
        "protocol": ATTEST_PROTOCOL,
        "nonce": nonce,
        "service_public_key": public_jwk,
        "signing_public_key": signing_jwk,
        "report_data": report_data(nonce, public_jwk, signing_jwk, claims).hex(),
        "quote": b64url(quote),
        "collateral": collateral,
        "event_log": event_log,
        "profile": claims.profile,
        "model": claims.model,
        "reference_values_id": claims.reference_values_id,
        "simulated": simulated,
    }
    if claims.gpu is not None:
        body["gpu"] = claims.gpu
        body["gpu_evidence"] = gpu_evidence
    if simulated:
        body["warning"] = "SIMULATED TDX: this quote proves nothing about the service"
    return body
