"""tdllm_attest: TDX attestation for the tdllm appliance.

Installable on its own (no torch): users verify an appliance with this package alone. The modules
follow go-tdx-guest's split into parsing (`abi`), cryptographic verification (`verify`) and policy
validation (`policy`); see docs/attestation.md. `client` is the SDK for a tdllm service: verify its
attestation, then chat with it end-to-end encrypted (docs/api.md).
"""

from tdllm_attest.errors import AttestationError

__all__ = ["AttestationError", "__version__"]

__version__ = "0.1.0"
