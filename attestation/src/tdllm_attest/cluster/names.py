"""Names inside a node certificate: how the WireGuard key and the quote ride in subjectAltName."""

from __future__ import annotations

import base64
import binascii
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509

from tdllm_attest.errors import ClusterCertificateError

WIREGUARD_URI_PREFIX = "urn:tdllm:wireguard:"
QUOTE_URI_PREFIX = "urn:tdllm:quote:sha256:"
WIREGUARD_KEY_SIZE = 32


def wireguard_uri(public_key: bytes) -> str:
    """The subjectAltName URI that names a WireGuard public key (wg's standard base64)."""
    if len(public_key) != WIREGUARD_KEY_SIZE:
        raise ValueError("a WireGuard public key is 32 bytes")
    return WIREGUARD_URI_PREFIX + base64.b64encode(public_key).decode()


def wireguard_key_from_uri(uri: str) -> bytes:
    """The 32 key bytes of a `wireguard_uri`; anything else is a ClusterCertificateError."""
    if not uri.startswith(WIREGUARD_URI_PREFIX):
        raise ClusterCertificateError(f"not a WireGuard key URI: {uri[:80]!r}")
    text = uri[len(WIREGUARD_URI_PREFIX) :]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClusterCertificateError("the WireGuard key URI is not base64") from None
    # one spelling per key: a second encoding of the same bytes would be a second "name"
    if len(key) != WIREGUARD_KEY_SIZE or base64.b64encode(key).decode() != text:
        raise ClusterCertificateError("the WireGuard key URI does not hold a 32-byte key")
    return key


def node_names(
    names: x509.SubjectAlternativeName, *, what: str, quote_uri: bool
) -> tuple[IPv4Address | IPv6Address, bytes | None]:
    """(address, WireGuard key) of a node's subjectAltName: exactly one IP address, at most one
    WireGuard key URI, and, in an issued certificate (`quote_uri`), the quote URI; nothing else."""
    addresses, keys = [], []
    for name in names:
        if isinstance(name, x509.IPAddress) and isinstance(name.value, IPv4Address | IPv6Address):
            addresses.append(name.value)
        elif isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(
            WIREGUARD_URI_PREFIX
        ):
            keys.append(wireguard_key_from_uri(name.value))
        elif (
            quote_uri
            and isinstance(name, x509.UniformResourceIdentifier)
            and name.value.startswith(QUOTE_URI_PREFIX)
        ):
            continue
        else:
            raise ClusterCertificateError(f"{what} names something a node may not have: {name}")
    if len(addresses) != 1 or len(keys) > 1:
        raise ClusterCertificateError(
            f"{what} must name exactly one IP address and at most one WireGuard key"
        )
    return addresses[0], (keys[0] if keys else None)
