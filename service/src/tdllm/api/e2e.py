"""POST /v1/e2e/chat/completions: the encrypted twin of /v1/chat/completions (tdllm-e2e/2).

The envelope is decrypted here, in the TD, with the attested service key; the plain request is
then dispatched in-process to the ordinary chat handler (same validation, limits, auth and
metrics), and its answer, errors included, is encrypted back under the request's keys and signed
with the attested signing key. With ``stream: true`` each SSE chunk of the plain stream becomes
one sealed record, sent as soon as the engine produces it. Nothing decrypted leaves this module
except as ciphertext.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from tdllm.api.e2e_protocol import (
    E2eDecryptError,
    ExchangeKeys,
    StreamSealer,
    open_request,
    seal_response,
)
from tdllm.api.openai import sse
from tdllm.api.openai.errors import invalid

blueprint = Blueprint("e2e", __name__)
_DATA = "data: "
_DONE = "[DONE]"


@blueprint.post("/v1/e2e/chat/completions")
def e2e_chat_completion() -> ResponseReturnValue:
    identity = current_app.extensions["tdllm"].identity
    try:
        payload, keys = open_request(identity.private_bytes(), request.get_json(silent=True))
    except E2eDecryptError as exc:
        raise invalid(str(exc), None, "e2e_decrypt_failed") from None
    inner = _dispatch(payload)
    streamed = isinstance(payload, dict) and payload.get("stream") is True
    if inner.mimetype != sse.MIMETYPE:  # a whole answer, or an error before any token
        body = inner.get_json(silent=True)
        inner.close()
        if streamed:  # a streaming client reads records only: the error is the final one
            final = StreamSealer(keys, identity.signing_key).final(inner.status_code, body)
            return Response(sse.event(final), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
        return jsonify(seal_response(keys, identity.signing_key, inner.status_code, body))
    records = _sealed_stream(inner.response, keys, identity.signing_key, inner.close)
    return Response(records, mimetype=sse.MIMETYPE, headers=sse.HEADERS)


def _dispatch(payload: Any) -> Response:
    """Run the plain chat handler on `payload` inside this process; never over the network.

    A streamed answer's body still runs under this inner request context: the chat handler
    wraps it in `stream_with_context`, which re-enters that context while we iterate.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]  # the real app
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    with app.test_request_context(
        "/v1/chat/completions", method="POST", json=payload, headers=headers
    ):
        response: Response = app.full_dispatch_request()
        return response


def _sealed_stream(
    events: Iterable[bytes | str],
    keys: ExchangeKeys,
    signer: Ed25519PrivateKey,
    close: Any,
) -> Iterator[str]:
    """One sealed record per plain SSE event; a signed final record after ``[DONE]``.

    Without ``[DONE]`` (the plain stream stopped early, e.g. an in-band error) the final record
    says 502, so a client never mistakes a cut answer for a complete one.
    """
    sealer = StreamSealer(keys, signer)
    done = False
    try:
        for raw in events:
            text = raw.decode() if isinstance(raw, bytes) else raw
            for line in text.split("\n"):
                if not line.startswith(_DATA):
                    continue
                data = line[len(_DATA) :]
                if data == _DONE:
                    done = True
                else:
                    yield sse.event(sealer.record(json.loads(data)))
        if done:
            yield sse.event(sealer.final(200, None))
        else:
            error = {"message": "the stream ended early", "type": "server_error"}
            yield sse.event(sealer.final(502, {"error": error}))
    finally:
        close()  # a client that went away cancels the sequence in the engine
