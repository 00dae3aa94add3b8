"""The model owner's cluster CA, held by the key broker: it certifies attested nodes only.

The broker calls `ClusterCa.issue` after a node's quote, its key policy and its CSR
(`request.parse_node_csr`, `policy.ClusterPolicy.check`) have passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdllm_attest.cluster.names import QUOTE_URI_PREFIX, wireguard_uri
from tdllm_attest.cluster.request import NodeRequest
from tdllm_attest.errors import ClusterCertificateError

DEFAULT_CA_LIFETIME = timedelta(days=365)


def _key_usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class ClusterCa:
    """The CA's key and self-signed certificate (path length 0: it certifies nodes only)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def __post_init__(self) -> None:
        try:
            constraints = self.certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError("the cluster CA certificate is not a CA certificate")
        if self.certificate.public_key() != self.key.public_key():
            raise ValueError("the cluster CA key does not match its certificate")

    @classmethod
    def generate(
        cls,
        *,
        now: datetime,
        name: str = "tdllm cluster CA",
        lifetime: timedelta = DEFAULT_CA_LIFETIME,
    ) -> ClusterCa:
        """A fresh P-256 CA valid from `now` for `lifetime`."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(sign=False, cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @classmethod
    def from_pem(cls, key_pem: bytes, certificate_pem: bytes) -> ClusterCa:
        """Load the CA from its PKCS#8 key and certificate PEMs (ValueError on anything off)."""
        key = load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the cluster CA key is not an EC private key")
        return cls(key, x509.load_pem_x509_certificate(certificate_pem))

    def certificate_pem(self) -> str:
        """The CA certificate as PEM text (what nodes trust)."""
        return self.certificate.public_bytes(Encoding.PEM).decode()

    def write(self, prefix: Path) -> tuple[Path, Path]:
        """PREFIX.key.pem (mode 0600, never overwritten) and PREFIX.crt.pem."""
        key_path = prefix.with_name(prefix.name + ".key.pem")
        cert_path = prefix.with_name(prefix.name + ".crt.pem")
        for path in (key_path, cert_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; refusing to overwrite a CA")
        pem = self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        cert_path.write_text(self.certificate_pem())
        return key_path, cert_path

    def issue(
        self,
        request: NodeRequest,
        *,
        now: datetime,
        lifetime: timedelta,
        quote_sha256: str,
    ) -> x509.Certificate:
        """A node certificate for a checked, policy-approved request (docs/attestation.md)."""
        ca_end = self.certificate.not_valid_after_utc
        if now >= ca_end or now < self.certificate.not_valid_before_utc:
            raise ClusterCertificateError(f"the cluster CA is not valid now (until {ca_end})")
        names: list[x509.GeneralName] = [x509.IPAddress(request.address)]
        if request.wireguard_key is not None:
            names.append(x509.UniformResourceIdentifier(wireguard_uri(request.wireguard_key)))
        names.append(x509.UniformResourceIdentifier(QUOTE_URI_PREFIX + quote_sha256))
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(request.address))])
            )
            .issuer_name(self.certificate.subject)
            .public_key(request.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now.astimezone(UTC))
            .not_valid_after(min(now + lifetime, ca_end))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign=True, cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key), False)
            .sign(self.key, hashes.SHA256())
        )


def load_cluster_ca(key_path: Path, certificate_path: Path) -> ClusterCa:
    """The broker's cluster CA from its two files (ValueError with the path on failure)."""
    try:
        return ClusterCa.from_pem(key_path.read_bytes(), certificate_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot load the cluster CA ({key_path}, {certificate_path}): {exc}"
        ) from None
