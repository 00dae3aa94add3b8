"""REPORTDATA binding: the 64 bytes the guest chose must be the value the verifier expects."""

from __future__ import annotations

import hmac

from tdllm_attest.abi import REPORT_DATA_SIZE
from tdllm_attest.errors import BindingError
from tdllm_attest.verify import VerifiedQuote


def expected_report_data(value: bytes) -> bytes:
    """Right-pad a value of at most 64 bytes with zeros (a 32-byte hash fills the first half)."""
    if len(value) > REPORT_DATA_SIZE:
        raise BindingError(f"expected report data is {len(value)} bytes, at most 64 allowed")
    return value + bytes(REPORT_DATA_SIZE - len(value))


def check_report_data(verified: VerifiedQuote, expected: bytes) -> None:
    """Constant-time comparison of the quote's REPORTDATA with `expected` (zero-padded to 64)."""
    want = expected_report_data(expected)
    found = verified.quote.td_report.report_data
    if not hmac.compare_digest(found, want):
        raise BindingError(f"report_data: found {found.hex()}, expected {want.hex()}")
