"""Errors of the trust boundary, raised on purpose and reported to people by the CLI."""

from __future__ import annotations

from tdllm.errors import ModelLoadError, TdllmError


class DeviceIntegrityError(TdllmError):
    """An untrusted device returned something the TD did not compute and would not accept.

    Serving through that device stops for good (the split refuses every later call): a host
    that forges hidden states could otherwise use the private tail as an oracle.
    """

    exit_code = 6


class PublicPrefixMismatchError(ModelLoadError):
    """A tensor meant for the untrusted device is not bit-identical to the public checkpoint."""
