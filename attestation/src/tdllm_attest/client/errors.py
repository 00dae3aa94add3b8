"""What the client SDK raises: leaves of `tdllm_attest.errors.AttestationError`.

Each carries the exit code `tdllm-chat` (and `tdllm chat`) ends with: 4 when the service's
attestation is refused (nothing was sent to it), 1 when the encrypted exchange itself failed.
Usage mistakes are click's (exit 2), found before any network.
"""

from __future__ import annotations

from tdllm_attest.errors import AttestationError

EXIT_EXCHANGE_FAILED = 1
EXIT_ATTESTATION_REFUSED = 4


class AttestationRefused(AttestationError):  # noqa: N818  # reads as the event
    """The service's attestation did not verify; nothing may be sent to it."""

    exit_code = EXIT_ATTESTATION_REFUSED


class E2eError(AttestationError):
    """The encrypted exchange failed (tampered answer, bad signature, service error)."""

    exit_code = EXIT_EXCHANGE_FAILED
