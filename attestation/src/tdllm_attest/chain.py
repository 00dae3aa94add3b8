"""X.509 chain checks with `cryptography`: issuer signatures, validity at `now`, pinned root."""

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
) -> None:
    """Check leaf-first `certs`: each signed by the next, all valid at `now`, last == anchor.

    The last certificate must be byte-identical to the anchor (a valid other root is refused).
    """
    now = require_aware(now)
    if len(certs) < 2:
        raise error(f"{what}: needs at least a leaf and the root, got {len(certs)} certificate(s)")
    if certs[-1].public_bytes(Encoding.DER) != anchor.der:
        raise error(f"{what}: root {_name(certs[-1])!r} is not the trust anchor")
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise error(
                f"{what}: {_name(cert)!r} is not valid at {now.isoformat()} "
                f"(valid {cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()})"
            )
    for child, parent in itertools.pairwise(certs):
        try:
            memo.check_issued_by(child, parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise error(
                f"{what}: {_name(child)!r} is not signed by {_name(parent)!r} "
                f"({exc or 'bad signature'})"
            ) from None


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
