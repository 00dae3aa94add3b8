"""The client SDK: verify a tdllm service's attestation, then chat with it end-to-end encrypted.

No torch and nothing of the service: `pip install tdllm-attest` is enough (an import-linter
contract keeps it so). The modules, bottom up:

- `binding`: what a service attestation's REPORTDATA binds (both sides compute it);
- `e2e_protocol`: the tdllm-e2e/3 wire format, both sides (HPKE request, salted answer keys,
  sealed records, Ed25519 signatures);
- `attest`: `verify_attestation` of a /v1/attestation answer against a signed reference-values
  policy, with the service's collateral or, better, the caller's own (`collateral_source`);
- `e2e`: `E2eClient`, which attests first and then talks only in ciphertext;
- `receipt_protocol`: the tdllm-receipt/1 bytes every answer's receipt is signed over, both sides;
- `receipt`: `verify_receipt`, an answer's receipt checked offline against its attestation;
- `chat_cli`: the `tdllm-chat` command (`tdllm chat` in the service is the same command);
- `errors`: `AttestationRefused`, `E2eError` and its `E2eServiceError` (the TD's own, sealed
  refusal), leaves of `AttestationError`.
"""

from tdllm_attest.client.attest import (
    AttestedService,
    anchor_for,
    load_reference_policy,
    new_nonce,
    require_e2e_profile,
    verify_attestation,
)
from tdllm_attest.client.e2e import E2eClient, RequestsTransport, Transport
from tdllm_attest.client.errors import AttestationRefused, E2eError, E2eServiceError
from tdllm_attest.client.receipt import ReceiptRefused, VerifiedReceipt, verify_receipt

__all__ = [
    "AttestationRefused",
    "AttestedService",
    "E2eClient",
    "E2eError",
    "E2eServiceError",
    "ReceiptRefused",
    "RequestsTransport",
    "Transport",
    "VerifiedReceipt",
    "anchor_for",
    "load_reference_policy",
    "new_nonce",
    "require_e2e_profile",
    "verify_attestation",
    "verify_receipt",
]
