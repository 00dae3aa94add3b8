"""Bounded memo of pure, time-independent results: parsed certificates/CRLs and verified signatures.

Verifying many quotes against the same collateral repeats the same work: parsing the collateral's
issuer chains and CRLs, checking their signatures, checking the PCK chain's signatures. Those
results depend only on the exact bytes involved, never on the time, so they are remembered here,
keyed by every input byte. Only successes are remembered: a failing check runs (and fails) again
each time. Everything that depends on `now` (validity periods, CRL and collateral dates, freshness
limits) and everything per quote (QE report and quote signatures) is still checked on every call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_MAXSIZE = 256


class BoundedCache(Generic[K, V]):
    """A thread-safe least-recently-used map holding at most `maxsize` entries."""

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value for `key`, or `compute()` stored (only if it returns, not raises)."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._maxsize:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_certificates: BoundedCache[bytes, x509.Certificate] = BoundedCache()
_crls: BoundedCache[bytes, x509.CertificateRevocationList] = BoundedCache()
_issued: BoundedCache[tuple[bytes, bytes], bool] = BoundedCache()
_crl_signatures: BoundedCache[tuple[bytes, bytes], bool] = BoundedCache()
_ecdsa: BoundedCache[tuple[bytes, bytes, bytes], bool] = BoundedCache()


def clear_all() -> None:
    """Forget everything (tests, or after rotating a trust anchor)."""
    for cache in (_certificates, _crls, _issued, _crl_signatures, _ecdsa):
        cache.clear()


def certificate_from_der(der: bytes) -> x509.Certificate:
    """Parse a DER certificate (raises `ValueError` like `cryptography`)."""
    return _certificates.get_or_compute(der, lambda: x509.load_der_x509_certificate(der))


def crl_from_der(der: bytes) -> x509.CertificateRevocationList:
    """Parse a DER CRL (raises `ValueError` like `cryptography`)."""
    return _crls.get_or_compute(der, lambda: x509.load_der_x509_crl(der))


def der_of(cert: x509.Certificate) -> bytes:
    """DER encoding of a certificate."""
    return cert.public_bytes(Encoding.DER)


def check_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    """`child.verify_directly_issued_by(parent)`, remembered by both certificates' DER bytes."""

    def verify() -> bool:
        child.verify_directly_issued_by(parent)
        return True

    _issued.get_or_compute((der_of(child), der_of(parent)), verify)


def crl_signature_valid(
    crl: x509.CertificateRevocationList,
    crl_der: bytes,
    issuer_key: ec.EllipticCurvePublicKey,
    issuer_der: bytes,
) -> bool:
    """`crl.is_signature_valid(issuer_key)` (`crl_der` is its encoding); only True is remembered."""

    def verify() -> bool:
        if not crl.is_signature_valid(issuer_key):
            raise InvalidSignature
        return True

    try:
        return _crl_signatures.get_or_compute((crl_der, issuer_der), verify)
    except InvalidSignature:
        return False


def check_ecdsa_sha256(
    key: ec.EllipticCurvePublicKey, key_der: bytes, der_signature: bytes, message: bytes
) -> None:
    """ECDSA-SHA256 verification (raises `InvalidSignature`), remembered by all input bytes."""

    def verify() -> bool:
        key.verify(der_signature, message, ec.ECDSA(hashes.SHA256()))
        return True

    _ecdsa.get_or_compute((key_der, der_signature, message), verify)
