"""The node's side of joining a cluster: keys made in the TD, the CSR, the certificate check.

The TLS key (Ray's mutual TLS) and the WireGuard key (the overlay that carries gloo and every
other byte between TDs) never leave the TD; the CSR naming both is bound into REPORTDATA by its
digest (`runtime_data.cluster_csr_sha256`), so the broker certifies exactly these keys.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID

from tdllm_attest.cluster.names import wireguard_uri
from tdllm_attest.cluster.peers import NodeCertificate, load_certificate, verify_node_certificate
from tdllm_attest.errors import ClusterCertificateError

NODE_KEY = "node.key"
NODE_CERT = "node.crt"
CA_CERT = "cluster-ca.crt"
WIREGUARD_KEY = "wg.key"


@dataclass(frozen=True)
class IssuedCertificate:
    """The node certificate and the CA it chains to, as PEM text (from the signed answer)."""

    certificate: str
    ca: str


@dataclass(frozen=True)
class NodeIdentity:
    """A node's fresh key pairs and the address it asks to be certified for."""

    address: IPv4Address | IPv6Address
    tls_key: ec.EllipticCurvePrivateKey = field(repr=False)
    wireguard_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, address: IPv4Address | IPv6Address) -> NodeIdentity:
        """New P-256 and X25519 key pairs, made here and now."""
        return cls(address, ec.generate_private_key(ec.SECP256R1()), X25519PrivateKey.generate())

    @property
    def wireguard_public(self) -> bytes:
        """The WireGuard public key (32 bytes)."""
        return self.wireguard_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def csr(self) -> bytes:
        """The DER CSR: subjectAltName = this address and this WireGuard key, nothing else."""
        names: list[x509.GeneralName] = [x509.IPAddress(self.address)]
        names.append(x509.UniformResourceIdentifier(wireguard_uri(self.wireguard_public)))
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(self.address))]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.tls_key, hashes.SHA256())
        )
        return request.public_bytes(Encoding.DER)

    def check_issued(self, issued: IssuedCertificate, *, now: datetime) -> NodeCertificate:
        """The certificate certifies our own TLS key, our address and WireGuard key, and chains
        to the answer's CA at `now` (ClusterCertificateError otherwise)."""
        certificate = load_certificate(issued.certificate.encode())
        ca = load_certificate(issued.ca.encode())
        node = verify_node_certificate(certificate, ca, now=now)
        if certificate.public_key() != self.tls_key.public_key():
            raise ClusterCertificateError("the node certificate is for another TLS key")
        if node.address != self.address or node.wireguard_key != self.wireguard_public:
            raise ClusterCertificateError(
                "the node certificate names another address or WireGuard key"
            )
        return node

    def write(self, directory: Path, issued: IssuedCertificate | None) -> None:
        """node.key and wg.key (0600), node.crt and cluster-ca.crt into `directory` (0700,
        memory-backed in the TD: /run). Each file is replaced whole (rename), never half; an
        answer without a certificate (`ReleasedKey.cluster` None) writes nothing (OSError)."""
        if issued is None:
            raise OSError("the key broker's answer has no node certificate")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        tls_pem = self.tls_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        wg = self.wireguard_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        files = {
            NODE_KEY: (tls_pem, 0o600),
            WIREGUARD_KEY: (base64.b64encode(wg) + b"\n", 0o600),
            NODE_CERT: (issued.certificate.encode(), 0o644),
            CA_CERT: (issued.ca.encode(), 0o644),
        }
        for name, (data, mode) in files.items():
            temporary = directory / f".{name}.new"
            temporary.unlink(missing_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            temporary.replace(directory / name)


def csr_digest(der: bytes) -> str:
    """What `runtime_data.cluster_csr_sha256` holds: the hex SHA-256 of the CSR's DER."""
    return hashlib.sha256(der).hexdigest()
