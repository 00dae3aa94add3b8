"""X.509 chain checks with `cryptography`: issuer signatures, validity at `now`, pinned root.

Beyond "signed by the next one", every issuer must be a CA allowed to sign certificates
(CA:TRUE and keyCertSign) and, where the caller says so, the leaf must NOT be one: a chain that
merely reaches Intel's root proves nothing about *which* of Intel's keys signed. A leaked PCK
leaf key chains to the root too, so who may sign what is pinned by the callers (collateral.py:
only the TCB Signing certificate, issued directly by the root, signs TCB Info / QE Identity).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest import memo
from tdllm_attest.clock import require_aware
from tdllm_attest.errors import AttestationError, ChainError
from tdllm_attest.trust import TrustAnchor

_pem_chains: memo.BoundedCache[bytes, tuple[x509.Certificate, ...]] = memo.BoundedCache()


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def verify_chain(
    certs: Sequence[x509.Certificate],
    anchor: TrustAnchor,
    now: datetime,
    *,
    error: type[AttestationError] = ChainError,
    what: str = "certificate chain",
    length: int | None = None,
    leaf_is_ca: bool = False,
) -> None:
    """Check leaf-first `certs`: each signed by the next, all valid at `now`, last == anchor.

    The last certificate must be byte-identical to the anchor (a valid other root is refused);
    `length`, when given, is the exact number of certificates; every issuer must be a CA with
    keyCertSign, and the leaf must be a CA exactly when `leaf_is_ca`.
    """
    now = require_aware(now)
    if len(certs) < 2:
        raise error(f"{what}: needs at least a leaf and the root, got {len(certs)} certificate(s)")
    if length is not None and len(certs) != length:
        raise error(f"{what}: has {len(certs)} certificates, must be exactly {length}")
    if certs[-1].public_bytes(Encoding.DER) != anchor.der:
        raise error(f"{what}: root {_name(certs[-1])!r} is not the trust anchor")
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise error(
                f"{what}: {_name(cert)!r} is not valid at {now.isoformat()} "
                f"(valid {cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()})"
            )
    _check_ca_flags(certs, error=error, what=what, leaf_is_ca=leaf_is_ca)
    check_signatures(certs, error=error, what=what)


def check_signatures(
    certs: Sequence[x509.Certificate], *, error: type[AttestationError], what: str
) -> None:
    """Each certificate of leaf-first `certs` signed by the next one (memoized), else `error`."""
    for child, parent in itertools.pairwise(certs):
        try:
            memo.check_issued_by(child, parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise error(
                f"{what}: {_name(child)!r} is not signed by {_name(parent)!r} "
                f"({exc or 'bad signature'})"
            ) from None


def is_ca(cert: x509.Certificate) -> bool:
    """CA:TRUE in BasicConstraints (absent means not a CA)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def may_sign_certificates(cert: x509.Certificate) -> bool:
    """CA:TRUE and keyCertSign: the certificate may issue others (RFC 5280 4.2.1.3, 4.2.1.9)."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return is_ca(cert) and usage.key_cert_sign


def _check_ca_flags(
    certs: Sequence[x509.Certificate],
    *,
    error: type[AttestationError],
    what: str,
    leaf_is_ca: bool,
) -> None:
    for issuer in certs[1:]:
        if not may_sign_certificates(issuer):
            raise error(f"{what}: issuer {_name(issuer)!r} is not a CA with keyCertSign")
    if is_ca(certs[0]) != leaf_is_ca:
        role = "a CA" if leaf_is_ca else "an end-entity certificate"
        raise error(f"{what}: {_name(certs[0])!r} must be {role}")


def common_name(cert: x509.Certificate) -> str:
    """The subject's CN ('' when absent)."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def load_pem_chain(
    pem: str | bytes, *, error: type[AttestationError], what: str
) -> list[x509.Certificate]:
    """Parse a PEM bundle into certificates, mapping any parse failure to `error`."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = _pem_chains.get_or_compute(
            data, lambda: tuple(x509.load_pem_x509_certificates(data))
        )
    except ValueError as exc:
        raise error(f"{what}: not a valid PEM certificate bundle ({exc})") from None
    return list(certs)
