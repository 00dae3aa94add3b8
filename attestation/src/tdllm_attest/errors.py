"""The error hierarchy of tdllm_attest: one base class, leaves that say what failed.

Every leaf carries the exit code that `tdllm-verify` uses for its failure class, so the CLI maps an
error to an exit code without a lookup table of its own (docs/attestation.md lists them).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARSE = 3
EXIT_SIGNATURE = 4
EXIT_COLLATERAL = 5
EXIT_TCB = 6
EXIT_POLICY = 7
EXIT_BINDING = 8
EXIT_POLICY_DOCUMENT = 9
EXIT_GPU_EVIDENCE = 10


class AttestationError(Exception):
    """Base of every error raised by tdllm_attest."""

    exit_code: int = EXIT_INTERNAL

    def diagnostics(self) -> str:
        """A one-paragraph explanation for people (CLI output, logs)."""
        return str(self)


class QuoteParseError(AttestationError):
    """The quote bytes are not a well-formed TDX quote (framing, sizes, types, PEM)."""

    exit_code = EXIT_PARSE


class SignatureError(AttestationError):
    """A signature in the quote does not verify, or the QE report does not bind the AK."""

    exit_code = EXIT_SIGNATURE


class ChainError(SignatureError):
    """The PCK certificate chain does not lead to the trust anchor, or a certificate is invalid."""


class CollateralError(AttestationError):
    """Collateral is malformed, badly signed, for another platform, or not fresh at `now`."""

    exit_code = EXIT_COLLATERAL


class TcbStatusError(AttestationError):
    """The platform TCB is not acceptable (no matching level, or a status the policy refuses)."""

    exit_code = EXIT_TCB


@dataclass(frozen=True)
class Mismatch:
    """One field of the evidence that differs from the reference value."""

    field: str
    found: str
    expected: str

    def __str__(self) -> str:
        return f"{self.field}: found {self.found}, expected {self.expected}"


class PolicyMismatch(AttestationError):  # noqa: N818  # the brief's name; it is an error
    """The evidence is genuine but not what the policy expects; holds every mismatch at once."""

    exit_code = EXIT_POLICY

    def __init__(self, mismatches: list[Mismatch] | tuple[Mismatch, ...]) -> None:
        self.mismatches: tuple[Mismatch, ...] = tuple(mismatches)
        super().__init__(
            f"{len(self.mismatches)} policy mismatch(es): "
            + "; ".join(str(m) for m in self.mismatches)
        )

    def diagnostics(self) -> str:
        return "\n".join(["policy mismatches:"] + [f"  - {m}" for m in self.mismatches])


class EventLogError(AttestationError):
    """An event log (CCEL or runtime RTMR3 log) is malformed."""

    exit_code = EXIT_POLICY


class BindingError(AttestationError):
    """REPORTDATA does not carry the expected value (nonce / key binding)."""

    exit_code = EXIT_BINDING


class PolicyDocumentError(AttestationError):
    """The policy document is malformed, fails its schema, or its signature does not verify."""

    exit_code = EXIT_POLICY_DOCUMENT


class GpuEvidenceError(AttestationError):
    """GPU evidence (SPDM report, device chain, RIM) is malformed, badly signed or untrusted."""

    exit_code = EXIT_GPU_EVIDENCE


class GpuPolicyError(AttestationError):
    """Genuine GPU evidence that the GPU policy refuses (nonce, versions, measurements, mode)."""

    exit_code = EXIT_POLICY


class ClusterCertificateError(AttestationError):
    """A node's certificate request or certificate is malformed, not what was asked for, or does
    not chain to the cluster CA (docs/attestation.md, "Node certificates for a cluster")."""

    exit_code = EXIT_SIGNATURE


class ClusterPolicyError(AttestationError):
    """A well-formed node certificate request the key's cluster policy refuses (address, keys)."""

    exit_code = EXIT_POLICY
