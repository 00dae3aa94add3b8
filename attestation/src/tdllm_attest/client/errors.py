"""What the client SDK raises: leaves of `tdllm_attest.errors.AttestationError`.

Each carries the exit code `tdllm-chat` (and `tdllm chat`) ends with: 4 when the service's
attestation is refused (nothing was sent to it), 1 when the encrypted exchange itself failed.
Usage mistakes are click's (exit 2), found before any network.
"""

from __future__ import annotations

from typing import Any

from tdllm_attest.errors import AttestationError

EXIT_EXCHANGE_FAILED = 1
EXIT_ATTESTATION_REFUSED = 4


class AttestationRefused(AttestationError):  # noqa: N818  # reads as the event
    """The service's attestation did not verify; nothing may be sent to it."""

    exit_code = EXIT_ATTESTATION_REFUSED


class E2eError(AttestationError):
    """The encrypted exchange failed (tampered answer, bad signature, service error)."""

    exit_code = EXIT_EXCHANGE_FAILED


class E2eServiceError(E2eError):
    """The TD itself answered with an error (a 4xx or 5xx, or an in-band error mid-stream).

    It arrived sealed and authenticated like any answer, so the host cannot forge or alter it;
    a refusal sent in clear (a replay, an envelope that does not decrypt) stays a plain
    `E2eError`. `status` is the plain endpoint's (None for an in-band stream error) and `error`
    its OpenAI error object (``{"message", "type", "param", "code"}``), or None if it had none.
    """

    def __init__(self, status: int | None, error: dict[str, Any] | None) -> None:
        self.status = status
        self.error = error
        message = error.get("message") if error is not None else None
        where = f"answered {status}" if status is not None else "failed mid-stream"
        super().__init__(f"the service {where}: {message}")
