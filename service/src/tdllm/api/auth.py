"""Optional bearer API keys for everything under /v1/ and for vLLM's /tokenize and
/detokenize, and who may scrape /metrics.

Health and readiness stay open for the supervisor and load balancer; /v1/attestation (and
/v1/attestation/receipts) and /v1/e2e/* take no key in clear (E2E seals its key inside the
envelope; the inner request is checked like any other). /metrics counts prompt tokens and times
every request, so it needs an API key when keys are configured and otherwise answers only
loopback peers. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from ipaddress import IPv6Address, ip_address

from flask import Flask, g, request

from tdllm.api.errors import ApiError
from tdllm_attest.client.receipt_protocol import RECEIPTS_PATH

# keys the prefix-cache scopes (`cache_scope`); new in every process, as the cache is
_SCOPE_SECRET = secrets.token_bytes(32)


def _bearer_matches(keys: Sequence[str]) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = token.strip().encode()
    ok = False
    for key in keys:  # no early exit: every key is compared
        ok |= hmac.compare_digest(given, key.encode())
    return scheme.lower() == "bearer" and ok


def require_api_key(keys: Sequence[str]) -> None:
    """Raise 401 unless the request carries one of `keys` as a bearer token."""
    if not _bearer_matches(keys):
        raise ApiError(
            401,
            "missing or invalid API key (send Authorization: Bearer <key>)",
            "authentication_error",
            None,
            "invalid_api_key",
        )


def cache_scope(key: str) -> bytes:
    """The prefix-cache scope of an API key (already checked): a keyed digest under a secret
    of this process, so the scope names the key to no one, not even in a log."""
    return hmac.digest(_SCOPE_SECRET, key.strip().encode(), "sha256")


def is_loopback(peer: str | None) -> bool:
    """Whether the direct peer is this machine (IPv4-mapped IPv6 included); unknown is not."""
    try:
        address = ip_address((peer or "").strip())
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def require_scraper(keys: Sequence[str]) -> None:
    """/metrics: an API key when keys exist (loopback is no excuse then), else a loopback peer.

    The service reads no forwarding header, so a reverse proxy on this machine makes every
    client loopback: deploy one only together with API keys.
    """
    if keys:
        require_api_key(keys)
    elif not is_loopback(request.remote_addr):
        raise ApiError(
            403,
            "metrics are served to loopback only (or configure api_keys and send one)",
            "permission_error",
            None,
            "metrics_forbidden",
        )


# Paths under /v1/ that must not ask for a key in clear: the attestations are public by design
# (quotes binding the service keys; the receipts one is what third parties checking a receipt
# need), and an end-to-end request carries its API key sealed inside the envelope, where only
# the TD reads it (e2e.py authenticates it there, with the same check). Exact paths, and one
# prefix that ends in a slash: a new route never opens up by sharing a name's beginning.
_NO_CLEAR_KEY_PATHS = frozenset({"/v1/attestation", RECEIPTS_PATH})
_NO_CLEAR_KEY_PREFIX = "/v1/e2e/"
# vLLM's paths outside /v1/ that take prompts: keyed like the OpenAI routes
KEYED_ROOT_PATHS = frozenset({"/tokenize", "/detokenize"})


def _needs_clear_key(path: str) -> bool:
    if path in KEYED_ROOT_PATHS:
        return True
    if not path.startswith("/v1/"):
        return False
    return path not in _NO_CLEAR_KEY_PATHS and not path.startswith(_NO_CLEAR_KEY_PREFIX)


def install_api_keys(app: Flask, keys: tuple[str, ...]) -> None:
    if not keys:
        return

    @app.before_request
    def _check() -> None:
        if _needs_clear_key(request.path):
            require_api_key(keys)
            g.cache_scope = cache_scope(request.headers["Authorization"].partition(" ")[2])
