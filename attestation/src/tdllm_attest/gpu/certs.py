"""X.509 chain checks shared by device chains and RIM chains (`cryptography`, never by hand).

The chain is leaf first and must end in the pinned root, byte for byte. Each certificate must be
valid at `now`; each issuer a CA with keyCertSign whose path-length limit holds; the leaf not a
CA; and no certificate may carry a critical extension we do not enforce (OpenSSL, which NVIDIA's
verifier uses, refuses those too).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from tdllm_attest import memo
from tdllm_attest.chain import check_signatures, is_ca, may_sign_certificates
from tdllm_attest.clock import require_aware
from tdllm_attest.errors import GpuEvidenceError

_ENFORCED_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def load_der_chain(ders: Sequence[bytes], what: str) -> list[x509.Certificate]:
    """Parse DER certificates, mapping any parse failure to `GpuEvidenceError`."""
    certs = []
    for position, der in enumerate(ders):
        try:
            certs.append(memo.certificate_from_der(der))
        except ValueError as exc:
            raise GpuEvidenceError(f"{what}: certificate {position} is not DER: {exc}") from None
    return certs


def _path_length(cert: x509.Certificate) -> int | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


def _check_extensions(cert: x509.Certificate, what: str) -> None:
    try:
        extensions = cert.extensions
    except ValueError as exc:  # duplicate or malformed extensions
        raise GpuEvidenceError(f"{what}: {_name(cert)!r} has bad extensions: {exc}") from None
    for ext in extensions:
        if ext.critical and ext.oid not in _ENFORCED_CRITICAL:
            raise GpuEvidenceError(
                f"{what}: {_name(cert)!r} has an unsupported critical extension "
                f"{ext.oid.dotted_string}"
            )


def verify_chain(
    certs: Sequence[x509.Certificate],
    root_der: bytes,
    now: datetime,
    *,
    what: str,
    length: int | None = None,
) -> None:
    """Raise `GpuEvidenceError` unless `certs` (leaf first) chain to `root_der` at `now`."""
    now = require_aware(now)
    if len(certs) < 2:
        raise GpuEvidenceError(
            f"{what}: needs a leaf and the root, got {len(certs)} certificate(s)"
        )
    if length is not None and len(certs) != length:
        raise GpuEvidenceError(f"{what}: has {len(certs)} certificates, must be exactly {length}")
    if memo.der_of(certs[-1]) != root_der:
        raise GpuEvidenceError(f"{what}: root {_name(certs[-1])!r} is not the pinned trust anchor")
    for cert in certs:
        _check_extensions(cert, what)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not start <= now <= end:
            raise GpuEvidenceError(
                f"{what}: {_name(cert)!r} is not valid at {now.isoformat()} "
                f"(valid {start.isoformat()} .. {end.isoformat()})"
            )
    if is_ca(certs[0]):
        raise GpuEvidenceError(f"{what}: leaf {_name(certs[0])!r} must not be a CA")
    for position, issuer in enumerate(certs[1:], start=1):
        if not may_sign_certificates(issuer):
            raise GpuEvidenceError(f"{what}: issuer {_name(issuer)!r} is not a CA with keyCertSign")
        limit = _path_length(issuer)
        # CA certificates between this issuer and the leaf (RFC 5280 4.2.1.9).
        if limit is not None and position - 1 > limit:
            raise GpuEvidenceError(f"{what}: {_name(issuer)!r} path length {limit} exceeded")
    check_signatures(certs, error=GpuEvidenceError, what=what)


def require_digital_signature(cert: x509.Certificate, what: str) -> None:
    """The signing leaf must be allowed to sign (keyUsage digitalSignature)."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise GpuEvidenceError(f"{what}: leaf {_name(cert)!r} has no keyUsage") from None
    if not usage.digital_signature:
        raise GpuEvidenceError(f"{what}: leaf {_name(cert)!r} may not sign (no digitalSignature)")
