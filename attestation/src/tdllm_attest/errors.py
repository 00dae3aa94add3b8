"""The error hierarchy of tdllm_attest: one base class, leaves that say what failed."""


class AttestationError(Exception):
    """Base of every error raised by tdllm_attest."""

    def diagnostics(self) -> str:
        """A one-paragraph explanation for people (CLI output, logs)."""
        return str(self)
