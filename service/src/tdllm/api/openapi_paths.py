"""The paths of the OpenAPI document: each route, its security, statuses and answer shapes
(tests/api/test_openapi_document.py holds them to the app's routes)."""

from __future__ import annotations

from typing import Any

from tdllm.api.openapi_schema_parts import (
    JSON,
    KEYED,
    OPEN,
    STRING,
    const,
    error_body,
    json_body,
    obj,
    ref,
)

_SSE_FRAMES = (
    "server-sent events: `data: <chunk JSON>` frames, the last one before `data: [DONE]` "
    "carrying `tdllm_receipt` when the service attests, then `data: [DONE]`; an error after the "
    'headers went out arrives as one `data: {"error": ...}` frame'
)


def _sse(description: str) -> dict[str, Any]:
    """One server-sent event, as schemathesis checks a stream's events."""
    return obj(["data"], {"data": STRING}, description=description)


_UNAUTHORIZED = error_body("missing or wrong API key (only when API keys are configured)")
_TOO_SLOW = error_body("the request body did not arrive within request_read_timeout_s")
_TOO_LARGE = error_body("the body exceeds max_body_bytes")


def _generation(operation_id: str, request: str, answer: str, what: str) -> dict[str, Any]:
    """POST /v1/completions and /v1/chat/completions: the same statuses, other shapes."""
    ok = json_body(f"{what}; `text/event-stream` when `stream` is true", ref(answer))
    ok["content"]["text/event-stream"] = {"schema": _sse(f"one event;  {_SSE_FRAMES}")}
    busy = error_body("the request queue is full; retry shortly")
    busy["headers"] = {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return {
        "post": {
            "operationId": operation_id,
            "security": KEYED,
            "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
            "responses": {
                "200": ok,
                "400": error_body(
                    "invalid request: malformed JSON, an unknown field, a value out of range, "
                    "a limit exceeded"
                ),
                "401": _UNAUTHORIZED,
                "404": error_body("no such model"),
                "408": _TOO_SLOW,
                "413": _TOO_LARGE,
                "429": busy,
                "503": error_body(
                    "not ready (booting, or the engine stopped) or the request timed out"
                ),
            },
        }
    }


def _tokenization(operation_id: str, request: str, answer: str, what: str) -> dict[str, Any]:
    """POST /tokenize and /detokenize (vLLM's): no queue in our engine, vLLM's on the vllm one."""
    return {
        "post": {
            "operationId": operation_id,
            "security": KEYED,
            "summary": f"{what} (vLLM's endpoint and shapes; docs/api.md)",
            "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
            "responses": {
                "200": json_body(what, ref(answer)),
                "400": error_body(
                    "invalid request: malformed JSON, an unknown field, a wrong type, a prompt "
                    "over the completions' limits, a token id outside the vocabulary, more ids "
                    "than max_model_len"
                ),
                "401": _UNAUTHORIZED,
                "404": error_body("no such model"),
                "408": _TOO_SLOW,
                "413": _TOO_LARGE,
                "429": error_body("the vllm engine only: too many requests in flight"),
                "502": error_body("the vllm engine only: vLLM failed the request"),
                "503": error_body("not ready (booting, or the engine stopped), or shutting down"),
            },
        }
    }


def paths() -> dict[str, Any]:
    e2e_ok = json_body(
        "the sealed, signed answer: {status, body} of the plain chat endpoint, errors included; "
        "`text/event-stream` of sealed records when the sealed request has `stream: true`",
        ref("E2eResponse"),
    )
    e2e_ok["content"]["text/event-stream"] = {
        "schema": _sse(
            'one event per record interval; `data: {"final": false, "ciphertext"}` (the first '
            'record also carries `salt`), then `data: {"final": true, "ciphertext", '
            '"signature"}` (docs/api.md)'
        )
    }
    return {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "liveness: the process answers",
                "responses": {
                    "200": json_body("alive", obj(["status"], {"status": const("string", "ok")}))
                },
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "readiness: completions can be served",
                "responses": {
                    "200": json_body(
                        "ready",
                        obj(
                            ["ready", "phase", "model"],
                            {"ready": const("boolean", True), "phase": STRING, "model": STRING},
                        ),
                    ),
                    "503": json_body(
                        "alive but not ready (attesting, loading, failed)",
                        obj(
                            ["ready", "phase", "reason"],
                            {
                                "ready": const("boolean", False),
                                "phase": STRING,
                                "reason": STRING,
                            },
                        ),
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "security": KEYED,
                "summary": "Prometheus metrics (docs/metrics.md): an API key when keys are "
                "configured, else loopback peers only",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": STRING}},
                    },
                    "401": _UNAUTHORIZED,
                    "403": error_body("no API keys are configured and the peer is not loopback"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "this description",
                "responses": {"200": json_body("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "security": KEYED,
                "summary": "the served model (empty until boot is done)",
                "responses": {
                    "200": json_body(
                        "the model list",
                        obj(
                            ["object", "data"],
                            {
                                "object": const("string", "list"),
                                "data": {"type": "array", "maxItems": 1, "items": ref("Model")},
                            },
                        ),
                    ),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "security": KEYED,
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": STRING}],
                "responses": {
                    "200": json_body("the model", ref("Model")),
                    "404": error_body("no such model"),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/v1/completions": _generation(
            "createCompletion", "CompletionRequest", "Completion", "the completion"
        ),
        "/v1/chat/completions": _generation(
            "createChatCompletion", "ChatCompletionRequest", "ChatCompletion", "the chat completion"
        ),
        "/tokenize": _tokenization(
            "tokenize", "TokenizeRequest", "TokenizeResponse", "text or messages to token ids"
        ),
        "/detokenize": _tokenization(
            "detokenize", "DetokenizeRequest", "DetokenizeResponse", "token ids to text"
        ),
        "/v1/attestation": {
            "get": {
                "operationId": "attestation",
                "security": OPEN,
                "summary": "a fresh TDX quote binding the nonce, the service keys and the served "
                "profile, model and reference-values id (docs/api.md#client-attestation)",
                "parameters": [
                    {
                        "name": "nonce",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^([0-9a-fA-F]{2}){16,64}$"},
                    }
                ],
                "responses": {
                    "200": json_body("the quote and the service key", ref("Attestation")),
                    "400": error_body("nonce missing or not 16..64 bytes of hex"),
                    "503": error_body(
                        "no attestation configured, the quote could not be produced, or the "
                        "configured runtime event log is unusable; `collateral_unavailable` when "
                        "the configured PCCS cannot serve collateral"
                    ),
                },
            }
        },
        "/v1/attestation/receipts": {
            "get": {
                "operationId": "receiptAttestation",
                "security": OPEN,
                "summary": "the receipt attestation: the quote every answer's receipt is signed "
                "under, for the fixed receipts nonce (docs/api.md#receipts)",
                "responses": {
                    "200": json_body(
                        "the /v1/attestation answer for the receipts nonce, with collateral "
                        "fetched now",
                        ref("ReceiptAttestation"),
                    ),
                    "503": error_body(
                        "not ready (receipts name the running model), no attestation configured, "
                        "the quote could not be produced, the runtime event log is unusable, or "
                        "`collateral_unavailable`"
                    ),
                },
            }
        },
        "/v1/e2e/chat/completions": {
            "post": {
                "operationId": "createE2eChatCompletion",
                "security": OPEN,
                "summary": "tdllm-e2e/3: an HPKE-sealed chat completion request, the API key "
                "sealed inside (docs/api.md#end-to-end-encrypted-mode-tdllm-e2e3)",
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": ref("E2eRequest")}},
                },
                "responses": {
                    "200": e2e_ok,
                    "400": error_body(
                        "the envelope is malformed or does not decrypt to this service key"
                    ),
                    "403": error_body(
                        "end-to-end mode is unavailable under this service's protection profile "
                        "(split and obfuscated show prompts to the untrusted device)"
                    ),
                    "408": _TOO_SLOW,
                    "409": error_body(
                        "a replayed envelope: this request encapsulation was already answered"
                    ),
                    "413": _TOO_LARGE,
                },
            }
        },
    }
