"""A node's certificate request (PKCS#10), checked strictly before the broker certifies it.

The request is bound by REPORTDATA, so its content is the TD's; the checks keep the broker from
certifying anything but what a node certificate may say (one address, one WireGuard key).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from tdllm_attest.cluster.names import node_names
from tdllm_attest.errors import ClusterCertificateError

MAX_CSR_BYTES = 4096
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
ALLOWED_HASHES = (hashes.SHA256, hashes.SHA384)


@dataclass(frozen=True)
class NodeRequest:
    """What a checked CSR asks the cluster CA to certify."""

    public_key: ec.EllipticCurvePublicKey
    address: IPv4Address | IPv6Address
    wireguard_key: bytes | None


def _subject_alt_name(csr: x509.CertificateSigningRequest) -> x509.SubjectAlternativeName:
    extensions = list(csr.extensions)
    if len(extensions) != 1 or extensions[0].oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        raise ClusterCertificateError("the CSR must carry exactly one extension: subjectAltName")
    value = extensions[0].value
    if not isinstance(value, x509.SubjectAlternativeName):
        raise ClusterCertificateError("the CSR's subjectAltName does not parse")
    return value


def parse_node_csr(der: bytes) -> NodeRequest:
    """Parse `der` and check its signature (proof of possession), key and names."""
    if len(der) > MAX_CSR_BYTES:
        raise ClusterCertificateError(f"the CSR is over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(der)
        names = _subject_alt_name(csr)
        signature_ok = csr.is_signature_valid
        hash_alg = csr.signature_hash_algorithm
        public_key = csr.public_key()
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise ClusterCertificateError(f"the CSR does not parse: {exc}") from None
    if not signature_ok:
        raise ClusterCertificateError("the CSR's signature does not verify under its own key")
    if not isinstance(hash_alg, ALLOWED_HASHES):
        raise ClusterCertificateError("the CSR is signed with a hash other than SHA-256/384")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ALLOWED_CURVES
    ):
        raise ClusterCertificateError("the CSR's key is not an EC P-256 or P-384 key")
    address, wireguard_key = node_names(names, what="the CSR", quote_uri=False)
    return NodeRequest(
        public_key=public_key,
        address=address,
        wireguard_key=wireguard_key,
    )
