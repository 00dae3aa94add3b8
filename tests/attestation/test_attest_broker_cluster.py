"""The key broker certifies cluster nodes: only a TD whose quote passed the key's policy gets a
node certificate, only for the CSR its REPORTDATA binds, only as the policy's `cluster` section
allows; the TD accepts only a certificate for its own keys, signed into the broker's answer.

Attacks first (the host relays both ways and may change anything): strip or swap the CSR, swap
it together with its binding, ask for an address outside the overlay, a name the certificate
must not carry, a CSR whose signature does not verify; swap the CA and certificate in the
answer; hand the TD another node's certificate. Each must fail closed with the right problem.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import timedelta
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdllm_attest.broker.client import BrokerAuthenticationError, KeyReleaseError, ReleasedKey
from tdllm_attest.cluster.ca import ClusterCa
from tdllm_attest.cluster.identity import IssuedCertificate, NodeIdentity, csr_digest
from tdllm_attest.cluster.names import QUOTE_URI_PREFIX, wireguard_uri
from tdllm_attest.cluster.peers import admit_peers, load_certificate
from tdllm_attest.cluster.policy import ClusterPolicy
from tdllm_attest.cluster.request import parse_node_csr
from tdllm_attest.errors import ClusterCertificateError
from tdllm_attest.wire import b64url, from_b64url
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    SIM_NOW,
    TEST_KEY_ID,
    FlaskTransport,
    SimulatedDeployment,
    simulated_deployment,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
OVERLAY = ip_network("10.77.0.0/24")
NODE_ADDRESS = ip_address("10.77.0.2")
CLUSTER_POLICY = ClusterPolicy((OVERLAY,))
Mutation = Callable[[str, dict[str, Any]], dict[str, Any]]


def _deployment(
    *, cluster: ClusterPolicy | None = CLUSTER_POLICY, ca: bool = True
) -> SimulatedDeployment:
    dep = simulated_deployment(cluster_ca=ClusterCa.generate(now=SIM_NOW) if ca else None)
    policy = dataclasses.replace(dep.settings.policies[POLICY_NAME], cluster=cluster)
    dep.settings = dataclasses.replace(dep.settings, policies={POLICY_NAME: policy})
    return dep


def _join(
    dep: SimulatedDeployment,
    node: NodeIdentity,
    mutate: Mutation | None = None,
    answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> ReleasedKey:
    transport = FlaskTransport(dep.app_client(), mutate=mutate)
    if answer is not None:
        post = transport.post_json

        def rewrite(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            status, doc = post(path, body)
            return status, answer(doc) if path.endswith("attest") and status == 200 else doc

        transport.post_json = rewrite  # type: ignore[method-assign]
    client = dep.key_client(transport)
    client.now = dep.clock
    return client.fetch_release(TEST_KEY_ID, node=node)


def _refusal(excinfo: pytest.ExceptionInfo[KeyReleaseError]) -> tuple[int, str]:
    problem = excinfo.value.problem
    return problem.get("status", 0), str(problem.get("type", "")).rsplit(":", 1)[-1]


def _csr(
    key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName], *, extra: bool = False
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    )
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if extra:  # a node certificate that could sign others
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


class _CraftedNode(NodeIdentity):
    """A TD whose CSR is `der` (to test what the broker accepts from a genuine TD)."""

    def __init__(self, der: bytes) -> None:
        base = NodeIdentity.generate(NODE_ADDRESS)
        object.__setattr__(self, "address", base.address)
        object.__setattr__(self, "tls_key", base.tls_key)
        object.__setattr__(self, "wireguard_key", base.wireguard_key)
        object.__setattr__(self, "_der", der)

    def csr(self) -> bytes:
        return self._der  # type: ignore[attr-defined,no-any-return]


def test_an_attested_node_gets_a_certificate_for_its_own_keys_and_address() -> None:
    dep = _deployment()
    node = NodeIdentity.generate(NODE_ADDRESS)
    release = _join(dep, node)
    assert bytes(release.key) == dep.data_keys[TEST_KEY_ID]  # the model key in the same exchange
    assert release.cluster is not None
    certificate = load_certificate(release.cluster.certificate.encode())
    assert certificate.public_key() == node.tls_key.public_key()
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [NODE_ADDRESS]
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    assert wireguard_uri(node.wireguard_public) in uris
    assert any(u.startswith(QUOTE_URI_PREFIX) for u in uris)
    assert certificate.not_valid_after_utc - SIM_NOW == timedelta(hours=24)
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_key_only_td_gets_no_certificate_and_the_same_signed_answer() -> None:
    dep = _deployment()
    client = dep.key_client(FlaskTransport(dep.app_client()))
    release = client.fetch_release(TEST_KEY_ID)
    assert release.cluster is None


def test_rejects_a_csr_stripped_from_the_request() -> None:
    def strip(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "cluster_csr"}

    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS), strip)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_the_hosts_own_csr_swapped_in_for_the_tds() -> None:
    """The host's CSR names its own key for the TD's address: the binding tells them apart."""
    hosts = NodeIdentity.generate(NODE_ADDRESS)

    def swap(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return body | {"cluster_csr": b64url(hosts.csr())} if "cluster_csr" in body else body

    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS), swap)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_a_csr_swapped_with_its_binding() -> None:
    """Changing runtime_data too breaks REPORTDATA: the quote binds the TD's CSR only."""
    hosts = NodeIdentity.generate(NODE_ADDRESS).csr()

    def swap(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "cluster_csr" not in body:
            return body
        runtime = body["runtime_data"] | {"cluster_csr_sha256": csr_digest(hosts)}
        return body | {"cluster_csr": b64url(hosts), "runtime_data": runtime}

    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS), swap)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_a_csr_stripped_together_with_its_binding() -> None:
    """The downgrade: the host removes both, so the request looks key-only; REPORTDATA still
    binds the CSR digest the TD put in, so the quote no longer matches."""

    def strip(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "cluster_csr" not in body:
            return body
        runtime = {k: v for k, v in body["runtime_data"].items() if k != "cluster_csr_sha256"}
        rest = {k: v for k, v in body.items() if k != "cluster_csr"}
        return rest | {"runtime_data": runtime}

    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS), strip)
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_refuses_a_certificate_under_a_policy_without_a_cluster_section() -> None:
    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(cluster=None), NodeIdentity.generate(NODE_ADDRESS))
    assert _refusal(excinfo) == (403, "policy-refused")


def test_refuses_an_address_outside_the_policys_overlay() -> None:
    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), NodeIdentity.generate(ip_address("192.168.1.5")))
    assert _refusal(excinfo) == (403, "policy-refused")


def test_refuses_a_csr_without_the_wireguard_key_the_policy_requires() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = _csr(key, [x509.IPAddress(NODE_ADDRESS)])
    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), _CraftedNode(der))
    assert _refusal(excinfo) == (403, "policy-refused")


@pytest.mark.parametrize(
    ("names", "extra"),
    [
        ([x509.IPAddress(NODE_ADDRESS), x509.DNSName("broker.example")], False),
        ([x509.IPAddress(NODE_ADDRESS), x509.IPAddress(ip_address("10.77.0.3"))], False),
        ([x509.IPAddress(NODE_ADDRESS), x509.UniformResourceIdentifier(QUOTE_URI_PREFIX)], False),
        ([x509.IPAddress(NODE_ADDRESS)], True),
    ],
    ids=["dns-name", "two-addresses", "quote-uri", "basic-constraints-ca"],
)
def test_rejects_a_csr_asking_for_more_than_a_node_may_have(
    names: list[x509.GeneralName], extra: bool
) -> None:
    der = _csr(ec.generate_private_key(ec.SECP256R1()), names, extra=extra)
    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), _CraftedNode(der))
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_rejects_a_csr_whose_signature_does_not_verify() -> None:
    der = bytearray(NodeIdentity.generate(NODE_ADDRESS).csr())
    der[-5] ^= 0x01  # inside the ECDSA signature
    with pytest.raises(ClusterCertificateError, match=r"signature|parse"):
        parse_node_csr(bytes(der))
    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(), _CraftedNode(bytes(der)))
    assert _refusal(excinfo) == (401, "evidence-rejected")


def test_a_broker_without_a_cluster_ca_answers_cluster_ca_unavailable() -> None:
    with pytest.raises(KeyReleaseError) as excinfo:
        _join(_deployment(ca=False), NodeIdentity.generate(NODE_ADDRESS))
    assert _refusal(excinfo) == (503, "cluster-ca-unavailable")


def test_refuses_an_answer_whose_ca_the_host_swapped_for_its_own() -> None:
    """The host certifies the TD's public key under its own CA (it saw the CSR): the broker's
    signature covers the cluster member, so the TD refuses before it trusts that CA."""
    hosts_ca = ClusterCa.generate(now=SIM_NOW)
    seen: list[str] = []

    def record(path: str, body: dict[str, Any]) -> dict[str, Any]:
        seen.extend([body["cluster_csr"]] if "cluster_csr" in body else [])
        return body

    def swap(doc: dict[str, Any]) -> dict[str, Any]:
        request = parse_node_csr(from_b64url(seen[-1]))
        forged = hosts_ca.issue(
            request, now=SIM_NOW, lifetime=timedelta(hours=1), quote_sha256="00" * 32
        )
        pem = forged.public_bytes(Encoding.PEM).decode()
        return doc | {"cluster": {"certificate": pem, "ca": hosts_ca.certificate_pem()}}

    with pytest.raises(BrokerAuthenticationError, match="not signed by the pinned broker key"):
        _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS), record, answer=swap)


def test_refuses_an_answer_without_the_certificate_it_asked_for() -> None:
    def drop(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k != "cluster"}

    with pytest.raises(BrokerAuthenticationError):
        _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS), answer=drop)


def test_a_node_refuses_another_nodes_certificate() -> None:
    ca = ClusterCa.generate(now=SIM_NOW)
    mine, other = NodeIdentity.generate(NODE_ADDRESS), NodeIdentity.generate(NODE_ADDRESS)
    certificate = ca.issue(
        parse_node_csr(other.csr()), now=SIM_NOW, lifetime=timedelta(hours=1), quote_sha256="0"
    )
    issued = IssuedCertificate(
        certificate.public_bytes(Encoding.PEM).decode(), ca.certificate_pem()
    )
    with pytest.raises(ClusterCertificateError, match="another TLS key"):
        mine.check_issued(issued, now=SIM_NOW)
    other.check_issued(issued, now=SIM_NOW)  # the same certificate is the other node's


def test_certificates_never_outlive_the_cluster_ca() -> None:
    ca = ClusterCa.generate(now=SIM_NOW, lifetime=timedelta(hours=2))
    node = NodeIdentity.generate(NODE_ADDRESS)
    certificate = ca.issue(
        parse_node_csr(node.csr()),
        now=SIM_NOW + timedelta(hours=1),
        lifetime=timedelta(days=1),
        quote_sha256="0",
    )
    assert certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc
    with pytest.raises(ClusterCertificateError, match="not valid now"):
        ca.issue(
            parse_node_csr(node.csr()),
            now=SIM_NOW + timedelta(hours=3),
            lifetime=timedelta(days=1),
            quote_sha256="0",
        )


def test_the_audit_log_names_the_certificate_issued(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tdllm_attest.broker.audit"):
        release = _join(_deployment(), NodeIdentity.generate(NODE_ADDRESS))
    assert release.cluster is not None
    serial = load_certificate(release.cluster.certificate.encode()).serial_number
    released = [r.getMessage() for r in caplog.records if r.getMessage().startswith("released")]
    assert f"serial={serial:x} address={NODE_ADDRESS}" in released[-1]


def test_joined_nodes_admit_each_other_and_nothing_else(tmp_path: Path) -> None:
    dep = _deployment()
    nodes = [NodeIdentity.generate(ip_address(f"10.77.0.{i}")) for i in (1, 2, 3)]
    releases = [_join(dep, node) for node in nodes]
    pems = {f"node{i}": r.cluster.certificate.encode() for i, r in enumerate(releases) if r.cluster}
    assert releases[0].cluster is not None
    ca = load_certificate(releases[0].cluster.ca.encode())
    admission = admit_peers(pems, ca, now=SIM_NOW, own_address=nodes[0].address)
    assert [p.address for p in admission.peers] == [nodes[1].address, nodes[2].address]
    assert [p.wireguard_key for p in admission.peers] == [
        nodes[1].wireguard_public,
        nodes[2].wireguard_public,
    ]
    nodes[0].write(tmp_path / "cluster", releases[0].cluster)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "cluster").iterdir()}
    assert modes == {"node.key": 0o600, "wg.key": 0o600, "node.crt": 0o644, "cluster-ca.crt": 0o644}
    assert (tmp_path / "cluster").stat().st_mode & 0o777 == 0o700


def test_the_roster_lists_the_unexpired_certificates_issued_under_a_key() -> None:
    dep = _deployment()
    app = dep.app_client()
    releases = []
    for last in (1, 2):
        client = dep.key_client(FlaskTransport(app))
        client.now = dep.clock
        releases.append(
            client.fetch_release(
                TEST_KEY_ID, node=NodeIdentity.generate(ip_address(f"10.77.0.{last}"))
            )
        )
    listed = app.get(f"/v1/cluster/nodes?key_id={TEST_KEY_ID}").get_json()["certificates"]
    assert listed == [r.cluster.certificate for r in releases if r.cluster]
    dep.clock.now = SIM_NOW + timedelta(hours=25)  # past the 24 h lifetime
    assert app.get(f"/v1/cluster/nodes?key_id={TEST_KEY_ID}").get_json()["certificates"] == []
    unknown = app.get("/v1/cluster/nodes?key_id=nope")
    assert unknown.status_code == 404 and unknown.get_json()["type"].endswith("unknown-key")


def test_the_roster_keeps_at_most_max_cluster_nodes_per_key() -> None:
    from tdllm_attest.broker.roster import NodeRoster

    roster = NodeRoster(lambda: SIM_NOW, max_nodes=2)
    for hours in (3, 1, 2):
        roster.add("k", f"cert-{hours}", SIM_NOW + timedelta(hours=hours))
    assert roster.certificates("k") == ["cert-2", "cert-3"]  # the soonest to expire went
