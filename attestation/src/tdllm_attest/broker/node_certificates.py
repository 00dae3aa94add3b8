"""Certify a cluster node in the key-release exchange (docs/attestation.md, "Node certificates
for a cluster"): only after the appraisal passed, only for the CSR REPORTDATA binds, only as the
key's `cluster` policy allows."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest.broker.appraisal import Appraisal
from tdllm_attest.broker.problems import ClusterCaUnavailable, EvidenceRejected, PolicyRefused
from tdllm_attest.broker.protocol import CLUSTER_CSR_KEY
from tdllm_attest.broker.settings import BrokerSettings
from tdllm_attest.cluster.identity import IssuedCertificate, csr_digest
from tdllm_attest.cluster.request import parse_node_csr
from tdllm_attest.errors import ClusterCertificateError, ClusterPolicyError
from tdllm_attest.wire import from_b64url


def certify_node(
    appraisal: Appraisal, cluster_csr: object, settings: BrokerSettings
) -> IssuedCertificate | None:
    """The node certificate for the request's `cluster_csr`, or None when it asks for none.

    A CSR without its binding (or the reverse) is the host adding or stripping one: refused.
    """
    runtime = appraisal.runtime_data or {}
    bound = runtime.get(CLUSTER_CSR_KEY)
    if cluster_csr is None and bound is None:
        return None
    if not isinstance(cluster_csr, str) or not isinstance(bound, str):
        raise EvidenceRejected("cluster_csr and runtime_data.cluster_csr_sha256 come together")
    try:
        der = from_b64url(cluster_csr)
    except ValueError:
        raise EvidenceRejected("cluster_csr is not base64url") from None
    if not hmac.compare_digest(bound, csr_digest(der)):
        raise EvidenceRejected("cluster_csr is not the CSR runtime_data binds")
    try:
        request = parse_node_csr(der)
    except ClusterCertificateError as exc:
        raise EvidenceRejected(f"cluster_csr: {exc}") from None
    policy = appraisal.policy
    if policy is None or policy.cluster is None:
        name = policy.name if policy else "?"
        raise PolicyRefused(f"policy {name!r} certifies no cluster nodes (no `cluster` section)")
    try:
        policy.cluster.check(request)
    except ClusterPolicyError as exc:
        raise PolicyRefused(f"policy {policy.name!r}: cluster: {exc}") from None
    if settings.cluster_ca is None:
        raise ClusterCaUnavailable("the broker has no cluster CA configured")
    try:
        certificate = settings.cluster_ca.issue(
            request,
            now=settings.now(),
            lifetime=policy.cluster.certificate_lifetime,
            quote_sha256=hashlib.sha256(appraisal.verified.quote.raw).hexdigest(),
        )
    except ClusterCertificateError as exc:
        raise ClusterCaUnavailable(str(exc)) from None
    return IssuedCertificate(
        certificate=certificate.public_bytes(Encoding.PEM).decode(),
        ca=settings.cluster_ca.certificate_pem(),
    )


def node_summary(issued: IssuedCertificate) -> str:
    """Serial, names and end of an issued certificate, for the audit log."""
    certificate = x509.load_pem_x509_certificate(issued.certificate.encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        f"serial={certificate.serial_number:x} "
        f"address={','.join(str(a) for a in names.get_values_for_type(x509.IPAddress))} "
        f"not_after={certificate.not_valid_after_utc.isoformat()}"
    )


def node_not_after(issued: IssuedCertificate) -> datetime:
    """When an issued certificate expires (the roster forgets it then)."""
    return x509.load_pem_x509_certificate(issued.certificate.encode()).not_valid_after_utc
