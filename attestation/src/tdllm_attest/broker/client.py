"""In-TD key client: challenge -> ephemeral key -> quote over REPORTDATA -> attest -> check the
pinned broker's signature -> unwrap.

HTTP goes through an injected `Transport` (`RequestsTransport` for real use; tests may adapt
Flask's test client). The data key is returned as a bytearray the caller can zero after use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwcrypto import jwk  # type: ignore[import-untyped]

from tdllm_attest.broker.protocol import (
    HASH_ALG,
    PATH_ATTEST,
    PATH_CHALLENGE,
    PROTOCOL,
    report_data_for,
    runtime_data,
)
from tdllm_attest.broker.signing import AnswerSignatureError, signed_answer, verify_answer
from tdllm_attest.broker.wrapping import decrypt_from_broker
from tdllm_attest.cluster.identity import IssuedCertificate, NodeIdentity, csr_digest
from tdllm_attest.errors import AttestationError, ClusterCertificateError
from tdllm_attest.gpu.binding import gpu_nonce
from tdllm_attest.gpu.evidence import GpuEvidence, evidence_digest
from tdllm_attest.quote import QuoteProvider
from tdllm_attest.wire import b64url, from_b64url


class KeyReleaseError(AttestationError):
    """The broker refused, or its answer was not a key for us. `problem` holds its problem+json."""

    def __init__(self, message: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.problem = problem or {}


class BrokerAuthenticationError(KeyReleaseError):
    """The answer is not one the pinned broker key signed for this exchange: an impostor, a
    tampered or replayed answer. Never retried."""


@dataclass(frozen=True)
class ReleasedKey:
    """A data key and what the broker released it for (from the signed, authenticated answer)."""

    key: bytearray = field(repr=False)
    model: str
    version: int
    # a cluster node's certificate (fetch_release(node=...)), checked against our own keys
    cluster: IssuedCertificate | None = None


class Transport(Protocol):
    """POST a JSON object to a broker path; return (HTTP status, decoded JSON object)."""

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Send `body` to `path`."""
        ...


@dataclass
class RequestsTransport:
    """A `requests` session against `base_url` (e.g. "https://kb.example:8443")."""

    base_url: str
    session: requests.Session = field(default_factory=requests.Session)
    timeout_s: float = 30.0

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        resp = self.session.post(self.base_url + path, json=body, timeout=self.timeout_s)
        try:
            doc = resp.json()
        except ValueError:
            doc = {}
        return resp.status_code, doc if isinstance(doc, dict) else {}


def _generate_ephemeral_key() -> Any:
    return jwk.JWK.generate(kty="OKP", crv="X25519")


@dataclass
class KeyClient:
    """Fetches data keys from a broker for this TD. `collateral` is optional JSON text.

    The ephemeral key lives only inside `fetch_key`; references to it are dropped on return
    (best effort: Python cannot guarantee the memory is zeroed).
    """

    transport: Transport
    provider: QuoteProvider
    # the broker's Ed25519 public key, pinned in the TD's measured image: answers must carry
    # its signature (an impostor broker run by the host has no way to make one)
    broker_key: Ed25519PublicKey
    collateral: Callable[[bytes], str] | None = None
    new_ephemeral_key: Callable[[], Any] = _generate_ephemeral_key
    # Event logs for a policy that replays RTMRs: the runtime RTMR3 log (JSON text) and the
    # CCEL ACPI table + log bytes; read at attest time, after the quote.
    runtime_log: Callable[[], str] | None = None
    ccel: Callable[[], tuple[bytes, bytes]] | None = None
    # the gpu-cc profile: evidence of the TD's confidential-computing GPUs for an SPDM nonce
    # (tdllm_attest.gpu.collect), made for this challenge and bound into REPORTDATA
    gpu_evidence: Callable[[bytes], Sequence[GpuEvidence]] | None = None
    # the clock that judges a node certificate's validity (injected; needed with `node=`)
    now: Callable[[], datetime] | None = None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, doc = self.transport.post_json(path, body)
        if status != 200:
            raise KeyReleaseError(f"broker refused {path}: {status} {doc.get('type', '')}", doc)
        return doc

    def fetch_key(self, key_id: str) -> bytearray:
        """Run the whole key-release protocol for `key_id`; return the data key."""
        return self.fetch_release(key_id).key

    def fetch_release(self, key_id: str, node: NodeIdentity | None = None) -> ReleasedKey:
        """Run the whole key-release protocol for `key_id`; return the data key with the model
        and version the (pinned, signature-checked) broker released it for.

        With `node` (a cluster node), REPORTDATA also binds the node's CSR and the answer must
        carry a signed node certificate for exactly its keys and address.
        """
        if node is not None and self.now is None:
            raise ValueError("a node certificate is judged at an injected time: pass now=")
        csr = None if node is None else node.csr()
        challenge = self._post(
            PATH_CHALLENGE, {"protocol": PROTOCOL, "tee": "tdx", "key_id": key_id}
        )
        session_id, nonce = challenge.get("session_id"), challenge.get("nonce")
        if not isinstance(session_id, str) or not isinstance(nonce, str):
            raise KeyReleaseError("challenge response lacks session_id / nonce")
        if challenge.get("hash_alg") != HASH_ALG:
            raise KeyReleaseError(f"broker asks for hash {challenge.get('hash_alg')!r}")
        gpu: list[dict[str, Any]] | None = None
        digest = None
        if self.gpu_evidence is not None:
            try:
                evidences = list(self.gpu_evidence(gpu_nonce(from_b64url(nonce))))
            except ValueError:
                raise KeyReleaseError("the broker's nonce is not base64url") from None
            gpu, digest = [e.to_json() for e in evidences], evidence_digest(evidences)
        ephemeral = self.new_ephemeral_key()
        try:
            runtime = runtime_data(
                session_id=session_id,
                nonce=nonce,
                key_id=key_id,
                tee_pubkey=ephemeral.export_public(as_dict=True),
                gpu_evidence_sha256=digest,
                cluster_csr_sha256=None if csr is None else csr_digest(csr),
            )
            quote = self.provider.get_quote(report_data_for(runtime))
            body: dict[str, Any] = {
                "session_id": session_id,
                "runtime_data": runtime,
                "quote": b64url(quote),
            }
            if gpu is not None:
                body["gpu_evidence"] = gpu
            if csr is not None:
                body["cluster_csr"] = b64url(csr)
            if self.collateral is not None:
                body["collateral"] = self.collateral(quote)
            if self.runtime_log is not None:
                body["runtime_log"] = self.runtime_log()
            if self.ccel is not None:
                table, data = self.ccel()
                body["ccel"] = {"table": b64url(table), "data": b64url(data)}
            answer = self._post(PATH_ATTEST, body)
            jwe_text, model, version, cluster = self._authentic(answer, runtime)
            issued = None
            if node is not None:
                issued = self._check_node_certificate(cluster, node)
            try:
                key = decrypt_from_broker(
                    jwe_text,
                    ephemeral,
                    key_id=key_id,
                    session_id=session_id,
                    model=model,
                    version=version,
                )
            except Exception as exc:  # any unwrap failure means "no key"
                raise KeyReleaseError(f"cannot unwrap the released key: {exc}") from None
            return ReleasedKey(bytearray(key), model, version, issued)
        finally:
            del ephemeral

    def _authentic(
        self, answer: dict[str, Any], runtime: dict[str, Any]
    ) -> tuple[str, str, int, dict[str, str] | None]:
        """(jwe, model, version, cluster) of an answer the pinned broker key signed for this
        exchange.

        Checked before the JWE is touched: an impostor broker (the host) could otherwise hand
        us a key of its choosing for a model it sealed itself.
        """
        jwe_text, model, version = answer.get("jwe"), answer.get("model"), answer.get("version")
        if answer.get("key_id") != runtime["key_id"] or not isinstance(jwe_text, str):
            raise BrokerAuthenticationError("attest response is not a key for this request")
        if not isinstance(model, str) or type(version) is not int:
            raise BrokerAuthenticationError("attest response names no model and version")
        cluster = answer.get("cluster")
        if cluster is not None and not (
            isinstance(cluster, dict)
            and set(cluster) == {"certificate", "ca"}
            and all(isinstance(v, str) for v in cluster.values())
        ):
            raise BrokerAuthenticationError("attest response's cluster member is malformed")
        document = signed_answer(
            session_id=runtime["session_id"],
            key_id=runtime["key_id"],
            tee_pubkey=runtime["tee_pubkey"],
            jwe=jwe_text,
            model=model,
            version=version,
            cluster=cluster,
        )
        try:
            verify_answer(self.broker_key, document, answer.get("signature"))
        except AnswerSignatureError as exc:
            raise BrokerAuthenticationError(str(exc)) from None
        return jwe_text, model, version, cluster

    def _check_node_certificate(
        self, cluster: dict[str, str] | None, node: NodeIdentity
    ) -> IssuedCertificate:
        """The signed answer's node certificate, if it certifies exactly our keys and address."""
        if cluster is None:
            raise BrokerAuthenticationError("the broker's answer carries no node certificate")
        issued = IssuedCertificate(certificate=cluster["certificate"], ca=cluster["ca"])
        if self.now is None:
            raise ValueError("a node certificate is judged at an injected time: pass now=")
        try:
            node.check_issued(issued, now=self.now())
        except ClusterCertificateError as exc:
            raise BrokerAuthenticationError(f"the node certificate is not ours: {exc}") from None
        return issued
