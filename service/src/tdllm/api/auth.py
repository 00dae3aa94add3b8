"""Optional bearer API keys for everything under /v1/ (health, readiness and metrics stay open
for the local supervisor and scraper). Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac

from flask import Flask, request

from tdllm.api.openai.errors import ApiError


def install_api_keys(app: Flask, keys: tuple[str, ...]) -> None:
    if not keys:
        return
    encoded = [k.encode() for k in keys]

    @app.before_request
    def _check() -> None:
        if not request.path.startswith("/v1/"):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode()
        ok = False
        for key in encoded:  # no early exit: every key is compared
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(
                401,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                "authentication_error",
                None,
                "invalid_api_key",
            )
