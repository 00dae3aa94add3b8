"""Which peers a node admits into its WireGuard overlay, and the documents that configure it.

Attacks first: the host hands a node a certificate from a lookalike CA (same name, its own
key), an expired one, one a node signed with its own (leaked) key as if it were a CA, one for
the node's own address, a stale one beside a fresh one, and an endpoint crafted to smuggle
lines into the `wg` configuration. The policy document and the broker's CA files are checked
as strictly.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from ipaddress import ip_address
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tdllm_attest.broker.cli import cluster_ca_settings, main
from tdllm_attest.cluster.ca import ClusterCa
from tdllm_attest.cluster.identity import NodeIdentity
from tdllm_attest.cluster.peers import admit_peers, parse_endpoints, render_wireguard_peers
from tdllm_attest.cluster.request import parse_node_csr
from tdllm_attest.errors import ClusterCertificateError, PolicyDocumentError
from tdllm_attest.policy_format import _cluster_policy
from tests.attestation.simulated_broker import SIM_NOW

HOUR = timedelta(hours=1)


def _issue(ca: ClusterCa, node: NodeIdentity, *, at: timedelta = timedelta(0)) -> bytes:
    certificate = ca.issue(
        parse_node_csr(node.csr()), now=SIM_NOW + at, lifetime=HOUR, quote_sha256="ab" * 32
    )
    return certificate.public_bytes(Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> ClusterCa:
    return ClusterCa.generate(now=SIM_NOW - HOUR)


def _node(last: int) -> NodeIdentity:
    return NodeIdentity.generate(ip_address(f"10.77.0.{last}"))


def test_refuses_a_certificate_from_a_lookalike_ca(ca: ClusterCa) -> None:
    lookalike = ClusterCa.generate(now=SIM_NOW - HOUR)  # same subject name, other key
    assert lookalike.certificate.subject == ca.certificate.subject
    admission = admit_peers({"fake": _issue(lookalike, _node(5))}, ca.certificate, now=SIM_NOW)
    assert admission.peers == ()
    assert "not a node certificate of the cluster CA" in admission.refused[0][1]


def test_refuses_an_expired_certificate_at_the_injected_time(ca: ClusterCa) -> None:
    pem = _issue(ca, _node(5))
    assert len(admit_peers({"n": pem}, ca.certificate, now=SIM_NOW).peers) == 1
    later = admit_peers({"n": pem}, ca.certificate, now=SIM_NOW + 2 * HOUR)
    assert later.peers == () and "not valid at validation time" in later.refused[0][1]


def test_refuses_a_peer_certified_by_a_nodes_own_key(ca: ClusterCa) -> None:
    """A leaked node key lower in the chain: node certificates are not CAs (and the CA has
    path length 0), so what a node signs certifies nobody."""
    insider = _node(2)
    insider_cert = x509.load_pem_x509_certificate(_issue(ca, insider))
    victim = _node(9)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "10.77.0.9")]))
        .issuer_name(insider_cert.subject)
        .public_key(victim.tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(SIM_NOW)
        .not_valid_after(SIM_NOW + HOUR)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(victim.address)]), critical=False
        )
        .sign(insider.tls_key, hashes.SHA256())
    )
    admission = admit_peers(
        {"forged": forged.public_bytes(Encoding.PEM)}, ca.certificate, now=SIM_NOW
    )
    assert admission.peers == ()
    assert "not a node certificate of the cluster CA" in admission.refused[0][1]


def test_keeps_the_newest_certificate_of_a_node_that_joined_again(ca: ClusterCa) -> None:
    first, again = _node(4), _node(4)
    pems = {"a": _issue(ca, first), "b": _issue(ca, again, at=timedelta(minutes=10))}
    admission = admit_peers(pems, ca.certificate, now=SIM_NOW + timedelta(minutes=20))
    assert [p.wireguard_key for p in admission.peers] == [again.wireguard_public]


def test_never_admits_its_own_address_as_a_peer(ca: ClusterCa) -> None:
    me, peer = _node(1), _node(2)
    pems = {"me": _issue(ca, me), "peer": _issue(ca, peer)}
    admission = admit_peers(pems, ca.certificate, now=SIM_NOW, own_address=me.address)
    assert [p.address for p in admission.peers] == [peer.address]


def test_renders_each_peer_with_its_one_address_only(ca: ClusterCa) -> None:
    peer = _node(2)
    admission = admit_peers({"p": _issue(ca, peer)}, ca.certificate, now=SIM_NOW)
    text = render_wireguard_peers(
        admission.peers, parse_endpoints({"10.77.0.2": "198.18.0.2:51820"})
    )
    assert f"PublicKey = {base64.b64encode(peer.wireguard_public).decode()}" in text
    assert "AllowedIPs = 10.77.0.2/32\n" in text and "Endpoint = 198.18.0.2:51820" in text


@pytest.mark.parametrize(
    "endpoint",
    [
        "198.18.0.2:51820\nAllowedIPs = 0.0.0.0/0",
        "evil.example:51820",
        "198.18.0.2:0",
        "198.18.0.2",
    ],
)
def test_refuses_an_endpoint_that_is_not_an_address_and_port(endpoint: str) -> None:
    with pytest.raises(ClusterCertificateError, match="want IP:port"):
        parse_endpoints({"10.77.0.2": endpoint})


def test_policy_cluster_section_is_checked_strictly() -> None:
    policy = _cluster_policy({"networks": ["10.77.0.0/24"], "certificate_lifetime_s": 3600})
    assert policy is not None and policy.certificate_lifetime == HOUR and policy.wireguard
    for bad in (
        {"networks": []},
        {"networks": ["10.77.0.1/24"]},  # host bits set: a typo, not a network
        {"networks": ["10.77.0.0/24"], "certificate_lifetime_s": 31 * 86400},
        {"networks": ["10.77.0.0/24"], "wireguard": "yes"},
        {"networks": ["10.77.0.0/24"], "extra": 1},
    ):
        with pytest.raises(PolicyDocumentError):
            _cluster_policy(bad)


def test_cluster_ca_command_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    prefix = tmp_path / "cluster-ca"
    result = CliRunner().invoke(main, ["cluster-ca", "--out", str(prefix)])
    assert result.exit_code == 0, result.output
    key, cert = tmp_path / "cluster-ca.key.pem", tmp_path / "cluster-ca.crt.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    loaded = cluster_ca_settings({"cluster_ca_key": str(key), "cluster_ca_cert": str(cert)})
    assert (
        loaded is not None
        and loaded.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.path_length
        == 0
    )
    again = CliRunner().invoke(main, ["cluster-ca", "--out", str(prefix)])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


def test_broker_config_refuses_a_ca_key_that_does_not_match_its_certificate(
    tmp_path: Path,
) -> None:
    one, two = (ClusterCa.generate(now=SIM_NOW) for _ in range(2))
    one.write(tmp_path / "one")
    two.write(tmp_path / "two")
    config = {
        "cluster_ca_key": str(tmp_path / "one.key.pem"),
        "cluster_ca_cert": str(tmp_path / "two.crt.pem"),
    }
    with pytest.raises(click.UsageError, match="does not match"):
        cluster_ca_settings(config)
    with pytest.raises(click.UsageError, match="come together"):
        cluster_ca_settings({"cluster_ca_key": config["cluster_ca_key"]})
