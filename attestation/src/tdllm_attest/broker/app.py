"""The key broker's HTTP surface: `POST /v1/challenge`, `POST /v1/attest`, `GET
/v1/cluster/nodes` (Flask).

Clients get terse RFC 7807 problems; the audit logger `tdllm_attest.broker.audit` gets every
decision with its full reason, the client address, session, key id and quote hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from tdllm_attest.broker.appraisal import appraise, parse_event_logs, parse_gpu_evidence
from tdllm_attest.broker.keystore import KeystoreError
from tdllm_attest.broker.node_certificates import certify_node, node_not_after, node_summary
from tdllm_attest.broker.problems import (
    BadRequest,
    BodyTooLarge,
    BrokerProblem,
    EvidenceRejected,
    PolicyRefused,
    UnknownKey,
)
from tdllm_attest.broker.protocol import (
    HASH_ALG,
    PATH_ATTEST,
    PATH_CHALLENGE,
    PATH_CLUSTER_NODES,
    PROBLEM_CONTENT_TYPE,
    PROTOCOL,
)
from tdllm_attest.broker.ratelimit import ForwardedClient, RateLimiter, rate_limit_key
from tdllm_attest.broker.roster import NodeRoster
from tdllm_attest.broker.sessions import SessionStore
from tdllm_attest.broker.settings import BrokerSettings
from tdllm_attest.broker.signing import sign_answer, signed_answer
from tdllm_attest.broker.wrapping import encrypt_to_tee
from tdllm_attest.wire import from_b64url

audit = logging.getLogger("tdllm_attest.broker.audit")
log = logging.getLogger(__name__)
MAX_KEY_ID_LENGTH = 256


def _problem(problem: BrokerProblem) -> Response:
    return Response(
        json.dumps(problem.body()), status=problem.status, content_type=PROBLEM_CONTENT_TYPE
    )


def _json_body() -> dict[str, Any]:
    try:
        doc = json.loads(request.get_data(cache=False))
    except RequestEntityTooLarge:
        raise
    except ValueError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body is not a JSON object")
    return doc


def _str_field(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_ID_LENGTH * 64:
        raise BadRequest(f"field {name!r} missing or not a non-empty string")
    return value


def create_app(settings: BrokerSettings) -> Flask:
    """Build the broker app around `settings` (all state lives in this app instance)."""
    app = Flask("tdllm_attest.broker")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # request.remote_addr is the client from here on: the peer, or who a trusted proxy names
    app.wsgi_app = ForwardedClient(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign]
    sessions = SessionStore(settings.now, settings.session_ttl, settings.max_sessions)
    roster = NodeRoster(settings.now, settings.max_cluster_nodes)
    limiter = RateLimiter(
        settings.now, settings.rate_limit, settings.rate_window, settings.max_rate_clients
    )
    if settings.simulated:
        log.warning(
            "UNSAFE: key broker in SIMULATED mode (test root sha256=%s); "
            "only keys marked 'simulated' can be released",
            settings.anchor.sha256,
        )

    @app.errorhandler(BrokerProblem)
    def on_problem(problem: BrokerProblem) -> Response:
        audit.warning(
            "refused client=%s path=%s status=%d type=%s reason=%s",
            request.remote_addr,
            request.path,
            problem.status,
            problem.code,
            problem.reason,
        )
        return _problem(problem)

    @app.errorhandler(HTTPException)
    def on_http(exc: HTTPException) -> Response:
        problem: BrokerProblem
        if isinstance(exc, RequestEntityTooLarge):
            problem = BodyTooLarge(f"body exceeds {settings.max_body_bytes} bytes")
        else:
            problem = BrokerProblem(f"HTTP {exc.code} on {request.method} {request.path}")
            problem.status = exc.code or 400
            problem.code = "http-" + str(problem.status)
            problem.title = exc.name
        return on_problem(problem)

    @app.before_request
    def rate_limit() -> None:
        limiter.hit(rate_limit_key(request.remote_addr or ""))

    @app.post(PATH_CHALLENGE)
    def challenge() -> Response:
        doc = _json_body()
        if doc.get("protocol") != PROTOCOL or doc.get("tee") != "tdx":
            raise BadRequest(f"protocol must be {PROTOCOL!r} and tee 'tdx'")
        key_id = _str_field(doc, "key_id")
        if len(key_id) > MAX_KEY_ID_LENGTH or settings.keystore.get(key_id) is None:
            raise UnknownKey(f"unknown key id {key_id[:MAX_KEY_ID_LENGTH]!r}")
        session = sessions.open(key_id)
        audit.info(
            "challenge client=%s session=%s key_id=%s",
            request.remote_addr,
            session.session_id,
            key_id,
        )
        return Response(
            json.dumps(
                {
                    "session_id": session.session_id,
                    "nonce": session.nonce,
                    "expires_at": int(session.expires_at.timestamp()),
                    "hash_alg": HASH_ALG,
                }
            ),
            content_type="application/json",
        )

    @app.get(PATH_CLUSTER_NODES)
    def cluster_nodes() -> Response:
        key_id = request.args.get("key_id", "")
        if not key_id or len(key_id) > MAX_KEY_ID_LENGTH or settings.keystore.get(key_id) is None:
            raise UnknownKey(f"unknown key id {key_id[:MAX_KEY_ID_LENGTH]!r}")
        body = {"key_id": key_id, "certificates": roster.certificates(key_id)}
        return Response(json.dumps(body), content_type="application/json")

    @app.post(PATH_ATTEST)
    def attest() -> Response:
        doc = _json_body()
        session = sessions.take(_str_field(doc, "session_id"))  # burned from here on
        try:
            raw_quote = from_b64url(_str_field(doc, "quote"))
        except ValueError:
            raise EvidenceRejected(
                f"session {session.session_id}: quote is not base64url"
            ) from None
        quote_hash = hashlib.sha256(raw_quote).hexdigest()
        record = settings.keystore.get(session.key_id)
        if record is None:
            raise UnknownKey(f"key {session.key_id!r} disappeared from the keystore")
        try:
            appraisal = appraise(
                session=session,
                record=record,
                runtime=doc.get("runtime_data"),
                raw_quote=raw_quote,
                request_collateral=doc.get("collateral"),
                settings=settings,
                event_logs=parse_event_logs(doc.get("ccel"), doc.get("runtime_log")),
                gpu_evidence=parse_gpu_evidence(doc.get("gpu_evidence")),
            )
            node = certify_node(appraisal, doc.get("cluster_csr"), settings)
        except BrokerProblem as problem:
            problem.reason = (
                f"session={session.session_id} key_id={session.key_id} "
                f"quote_sha256={quote_hash}: {problem.reason}"
            )
            raise
        try:
            data_key = settings.keystore.unwrap(record)
        except KeystoreError as exc:
            raise PolicyRefused(f"keystore: {exc}") from None
        jwe = encrypt_to_tee(
            data_key,
            appraisal.tee_pubkey,
            key_id=record.key_id,
            session_id=session.session_id,
            model=record.model,
            version=record.version,
        )
        audit.info(
            "released client=%s session=%s key_id=%s model=%r version=%d mode=%s tcb=%s "
            "quote_sha256=%s gpus=%s node=%s",
            request.remote_addr,
            session.session_id,
            record.key_id,
            record.model,
            record.version,
            appraisal.mode,
            appraisal.verified.tcb_status,
            quote_hash,
            json.dumps([gpu.summary() for gpu in appraisal.gpus]),
            "-" if node is None else node_summary(node),
        )
        cluster = None if node is None else {"certificate": node.certificate, "ca": node.ca}
        if node is not None:
            roster.add(record.key_id, node.certificate, node_not_after(node))
        signed = signed_answer(
            session_id=session.session_id,
            key_id=record.key_id,
            tee_pubkey=appraisal.tee_jwk,
            jwe=jwe,
            model=record.model,
            version=record.version,
            cluster=cluster,
        )
        answer: dict[str, Any] = {
            "key_id": record.key_id,
            "jwe": jwe,
            "model": record.model,
            "version": record.version,
            "signature": sign_answer(settings.signing_key, signed),
            "result": appraisal.summary(),
        }
        if cluster is not None:
            answer["cluster"] = cluster
        return Response(json.dumps(answer), content_type="application/json")

    return app
