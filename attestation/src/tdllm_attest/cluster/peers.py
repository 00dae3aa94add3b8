"""Which nodes a TD admits: certificates that chain to the cluster CA, valid now, one name each.

Peer certificates travel over the host (they are public); the CA certificate came in the
broker's signed answer, so only nodes the broker certified after their attestation pass here.
The WireGuard peer of a node is allowed exactly its one certified address: it can only speak
as itself on the overlay.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, ip_address

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tdllm_attest.cluster.names import node_names
from tdllm_attest.errors import ClusterCertificateError


@dataclass(frozen=True)
class NodeCertificate:
    """A verified node certificate: the node's overlay address and WireGuard key."""

    address: IPv4Address | IPv6Address
    wireguard_key: bytes | None
    not_before: datetime
    not_after: datetime
    sha256: str  # of the DER: names the certificate in logs


def load_certificate(pem: bytes) -> x509.Certificate:
    """One PEM certificate (ClusterCertificateError if it is not one)."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ClusterCertificateError(f"not a PEM certificate: {exc}") from None


def _names(certificate: x509.Certificate) -> tuple[IPv4Address | IPv6Address, bytes | None]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        raise ClusterCertificateError("the certificate has no subjectAltName") from None
    return node_names(san, what="the certificate", quote_uri=True)


def verify_node_certificate(
    certificate: x509.Certificate, ca: x509.Certificate, *, now: datetime
) -> NodeCertificate:
    """Check `certificate` is a node certificate of `ca`, valid at `now`, usable as TLS client
    and server for its own address; return what it certifies."""
    address, wireguard_key = _names(certificate)
    builder = PolicyBuilder().store(Store([ca])).time(now)
    try:
        builder.build_client_verifier().verify(certificate, [])
        builder.build_server_verifier(x509.IPAddress(address)).verify(certificate, [])
    except VerificationError as exc:
        raise ClusterCertificateError(f"not a node certificate of the cluster CA: {exc}") from None
    return NodeCertificate(
        address=address,
        wireguard_key=wireguard_key,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        sha256=hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest(),
    )


@dataclass(frozen=True)
class Admission:
    """The peers admitted, and why each other certificate was not (for the log)."""

    peers: tuple[NodeCertificate, ...]
    refused: tuple[tuple[str, str], ...]  # (where it came from, why)


def admit_peers(
    certificates: Mapping[str, bytes],
    ca: x509.Certificate,
    *,
    now: datetime,
    own_address: IPv4Address | IPv6Address | None = None,
    require_wireguard: bool = True,
) -> Admission:
    """Verify each PEM in `certificates` (source name -> PEM); keep the newest certificate per
    address (a node that joined again has a new key), never our own address."""
    newest: dict[IPv4Address | IPv6Address, NodeCertificate] = {}
    refused: list[tuple[str, str]] = []
    for source, pem in sorted(certificates.items()):
        try:
            node = verify_node_certificate(load_certificate(pem), ca, now=now)
        except ClusterCertificateError as exc:
            refused.append((source, str(exc)))
            continue
        if require_wireguard and node.wireguard_key is None:
            refused.append((source, "the certificate names no WireGuard key"))
        elif node.address == own_address:
            continue
        elif node.address not in newest or node.not_before > newest[node.address].not_before:
            newest[node.address] = node
    return Admission(tuple(newest[a] for a in sorted(newest, key=str)), tuple(refused))


def parse_endpoints(text: Mapping[str, str]) -> dict[IPv4Address | IPv6Address, str]:
    """Overlay address -> underlay `IP:port` (from the playbook; the host can lie about these,
    which costs availability only: WireGuard authenticates the peer, not its endpoint). Only
    an address and a port pass, so nothing else reaches the `wg` configuration."""
    endpoints: dict[IPv4Address | IPv6Address, str] = {}
    for address, endpoint in text.items():
        try:
            host, _, port = str(endpoint).rpartition(":")
            underlay = ip_address(host.removeprefix("[").removesuffix("]"))
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(port)
            overlay = ip_address(address)
        except ValueError:
            raise ClusterCertificateError(
                f"endpoint {str(endpoint)[:80]!r} for {str(address)[:80]!r}: want IP:port"
            ) from None
        spelled = f"[{underlay}]" if underlay.version == 6 else str(underlay)
        endpoints[overlay] = f"{spelled}:{int(port)}"
    return endpoints


def render_wireguard_peers(
    peers: Iterable[NodeCertificate], endpoints: Mapping[IPv4Address | IPv6Address, str]
) -> str:
    """The [Peer] sections of a `wg setconf` file: one per admitted node, its address only."""
    sections = []
    for peer in peers:
        if peer.wireguard_key is None:
            continue  # no overlay for a node without a WireGuard key (admit_peers refuses it)
        prefix = 32 if isinstance(peer.address, IPv4Address) else 128
        lines = [
            "[Peer]",
            f"# node certificate sha256 {peer.sha256}, valid until {peer.not_after.isoformat()}",
            f"PublicKey = {base64.b64encode(peer.wireguard_key).decode()}",
            f"AllowedIPs = {peer.address}/{prefix}",
        ]
        if peer.address in endpoints:
            lines.append(f"Endpoint = {endpoints[peer.address]}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + ("\n" if sections else "")
