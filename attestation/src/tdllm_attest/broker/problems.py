"""Broker errors: terse RFC 7807 problem types for the client, full reasons for the audit log."""

from __future__ import annotations

from typing import Any

from tdllm_attest.broker.protocol import ERROR_TYPE_PREFIX


class BrokerProblem(Exception):  # noqa: N818  # an RFC 7807 "problem"
    """A refused request. `reason` goes only to the audit log; the client sees type and title."""

    status = 400
    code = "bad-request"
    title = "The request is malformed"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def type_uri(self) -> str:
        """The machine-readable problem type."""
        return ERROR_TYPE_PREFIX + self.code

    def body(self) -> dict[str, Any]:
        """The problem+json document sent to the client (no internal detail)."""
        return {"type": self.type_uri, "title": self.title, "status": self.status}


class BadRequest(BrokerProblem):
    """Malformed JSON or fields."""


class InvalidSession(BrokerProblem):
    """Unknown, used, burned or expired session."""

    status = 401
    code = "invalid-session"
    title = "The session is not valid"


class EvidenceRejected(BrokerProblem):
    """The quote is not genuine, not fresh, or does not bind this session's runtime data."""

    status = 401
    code = "evidence-rejected"
    title = "The attestation evidence was rejected"


class PolicyRefused(BrokerProblem):
    """Genuine evidence that the key's policy or release modes do not allow."""

    status = 403
    code = "policy-refused"
    title = "The key may not be released to this TD"


class CollateralUnavailable(BrokerProblem):
    """The broker cannot get current collateral of its own (PCCS down, stale): retry later.

    Never answered by falling back to collateral the request (the host) supplies.
    """

    status = 503
    code = "collateral-unavailable"
    title = "Attestation collateral is unavailable; retry later"


class UnknownKey(BrokerProblem):
    """No such key id in the keystore."""

    status = 404
    code = "unknown-key"
    title = "No such key"


class BodyTooLarge(BrokerProblem):
    """The request body exceeds the broker's limit."""

    status = 413
    code = "body-too-large"
    title = "The request body is too large"


class RateLimited(BrokerProblem):
    """Too many requests from this client."""

    status = 429
    code = "rate-limited"
    title = "Too many requests"


class ClusterCaUnavailable(BrokerProblem):
    """The key's policy certifies cluster nodes, but the broker has no (valid) cluster CA."""

    status = 503
    code = "cluster-ca-unavailable"
