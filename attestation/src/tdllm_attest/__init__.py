"""tdllm_attest: TDX attestation for the tdllm appliance.

Installable on its own (no torch): users verify an appliance with this package alone. The modules
follow go-tdx-guest's split into parsing (`abi`), cryptographic verification (`verify`), the
policy format (`policy_format`) and policy validation (`policy`); see docs/attestation.md. `client`
is the SDK for a tdllm service: verify its attestation, then chat with it end-to-end encrypted
(docs/api.md). `testing` is the UNSAFE simulator (test PKI, synthetic quotes, simulated quote
service), which no production module imports.
"""

from tdllm_attest.errors import AttestationError

__all__ = ["AttestationError", "__version__"]

__version__ = "0.1.0"
