"""Independent `cryptography` re-check of what dcap-qvl also verifies.

Both must agree: a parser bug in either (offsets, lengths) cannot then make a forged quote pass.
Checks: the attestation key's signature over header+body, the PCK leaf's signature over the QE
report, the QE report-data binding of the attestation key, and the PCK chain to the anchor,
including revocation by the supplied CRLs.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tdllm_attest import memo
from tdllm_attest.abi import Quote
from tdllm_attest.chain import verify_chain
from tdllm_attest.collateral import Collateral
from tdllm_attest.errors import ChainError, CollateralError, SignatureError
from tdllm_attest.trust import TrustAnchor

_HALF = 32


def _raw_signature_to_der(raw: bytes) -> bytes:
    return encode_dss_signature(
        int.from_bytes(raw[:_HALF], "big"), int.from_bytes(raw[_HALF:], "big")
    )


def _verify_p256(key: ec.EllipticCurvePublicKey, raw_sig: bytes, message: bytes, what: str) -> None:
    try:
        key.verify(_raw_signature_to_der(raw_sig), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(f"{what} does not verify") from None


def attestation_key(quote: Quote) -> ec.EllipticCurvePublicKey:
    """The quote's attestation key (raw x||y on P-256) as a `cryptography` key."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.signature_data.attestation_key
        )
    except ValueError:
        raise SignatureError("attestation key is not a point on P-256") from None


def pck_certificates(quote: Quote) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """The embedded PCK leaf, intermediate CA and root as certificate objects."""
    leaf, ca, root = (
        memo.certificate_from_der(d) for d in quote.signature_data.pck_chain.certificates_der
    )
    return leaf, ca, root


def check_quote_signature(quote: Quote) -> None:
    """The attestation key signs the header and body."""
    _verify_p256(
        attestation_key(quote),
        quote.signature_data.quote_signature,
        quote.signed_region,
        "quote signature by the attestation key",
    )


def check_qe_report_signature(quote: Quote) -> None:
    """The PCK leaf key signs the 384-byte QE report."""
    leaf = pck_certificates(quote)[0]
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ChainError("PCK leaf certificate does not hold an EC key")
    sig = quote.signature_data
    _verify_p256(
        key, sig.qe_report_signature, sig.qe_report.raw, "QE report signature by the PCK leaf"
    )


def check_qe_binding(quote: Quote) -> None:
    """QE report-data = SHA-256(attestation key || QE auth data) || 32 zero bytes."""
    sig = quote.signature_data
    expected = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest() + bytes(_HALF)
    if not hmac.compare_digest(sig.qe_report.report_data, expected):
        raise SignatureError("QE report does not bind the attestation key (report-data mismatch)")


def check_pck_chain(
    quote: Quote, anchor: TrustAnchor, now: datetime, collateral: Collateral
) -> None:
    """PCK leaf -> CA -> anchor, valid at `now`, neither leaf nor CA revoked."""
    leaf, ca, root = pck_certificates(quote)
    verify_chain(
        [leaf, ca, root], anchor, now, error=ChainError, what="PCK certificate chain", length=3
    )
    try:
        pck_crl = memo.crl_from_der(collateral.pck_crl)
        root_crl = memo.crl_from_der(collateral.root_ca_crl)
    except ValueError:
        raise CollateralError("collateral CRL is not DER") from None
    if pck_crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
        raise ChainError(f"PCK leaf certificate (serial {leaf.serial_number:x}) is revoked")
    if root_crl.get_revoked_certificate_by_serial_number(ca.serial_number) is not None:
        raise ChainError(f"PCK CA certificate (serial {ca.serial_number:x}) is revoked")
