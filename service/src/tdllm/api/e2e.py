"""POST /v1/e2e/chat/completions: the encrypted twin of /v1/chat/completions (tdllm-e2e/1).

The envelope is decrypted here, in the TD, with the attested service key; the plain request is
then dispatched in-process to the ordinary chat handler (same validation, limits, auth and
metrics), and its whole answer, errors included, is encrypted back under the request's response
key. Nothing decrypted leaves this function except as ciphertext. Streaming is refused for now
(each chunk would need its own sealed frame): ``stream: true`` gets an encrypted 400.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from tdllm.api.e2e_protocol import E2eDecryptError, open_request, seal_response
from tdllm.api.openai.errors import invalid

blueprint = Blueprint("e2e", __name__)


@blueprint.post("/v1/e2e/chat/completions")
def e2e_chat_completion() -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    raw = service.identity.private_key.private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )
    try:
        payload, key = open_request(raw, request.get_json(silent=True))
    except E2eDecryptError as exc:
        raise invalid(str(exc), None, "e2e_decrypt_failed") from None
    if isinstance(payload, dict) and payload.get("stream"):
        error = invalid("stream is not supported in e2e mode yet", "stream").body()
        return jsonify(seal_response(key, 400, error))
    status, body = _dispatch(payload)
    return jsonify(seal_response(key, status, body))


def _dispatch(payload: Any) -> tuple[int, Any]:
    """Run the plain chat handler on `payload` inside this process; never over the network."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]  # the real app
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    with app.test_request_context(
        "/v1/chat/completions", method="POST", json=payload, headers=headers
    ):
        response = app.full_dispatch_request()
        return response.status_code, response.get_json(silent=True)
