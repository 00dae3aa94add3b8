"""The OpenAPI 3.1 description of this service, built in Python (GET /openapi.json serves it).

The request bodies come from the field tables the validator itself runs on
(`tdllm.api.openai.request_fields`: COMPLETION_SPECS, CHAT_SPECS; `chat_messages`:
MESSAGE_SCHEMA), and the error shape from `ApiError`, so neither can drift from the code that
enforces it. The rest (paths, status codes, answer shapes) is declared here;
tests/api/test_openapi_document.py holds the paths to the app's routes and the schemas to the
validator, and tests/api/test_openapi_fuzz.py fuzzes the app against the whole document (no 5xx,
every answer documented).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from tdllm import __version__
from tdllm.api.errors import ApiError
from tdllm.api.openai.chat_messages import MESSAGE_SCHEMA, TEXT_PART_SCHEMA
from tdllm.api.openai.request_fields import (
    CHAT_SPECS,
    COMPLETION_SPECS,
    DETOKENIZE_SPECS,
    TOKENIZE_CHAT_SPECS,
    TOKENIZE_COMPLETION_SPECS,
    request_schema,
)

_JSON = "application/json"
_OPEN: list[dict[str, list[str]]] = [{}]  # no key needed
_KEYED: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # a key when keys are configured
_SSE_FRAMES = (
    "server-sent events: `data: <chunk JSON>` frames, the last one before `data: [DONE]` "
    "carrying `tdllm_receipt` when the service attests, then `data: [DONE]`; an error after the "
    'headers went out arrives as one `data: {"error": ...}` frame'
)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, **extra}


def _const(kind: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "const": value}


_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_BOOLEAN = {"type": "boolean"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, ref("Error"))


def _sse(description: str) -> dict[str, Any]:
    """One server-sent event, as schemathesis checks a stream's events."""
    return _obj(["data"], {"data": _STRING}, description=description)


_UNAUTHORIZED = _error("missing or wrong API key (only when API keys are configured)")
_TOO_SLOW = _error("the request body did not arrive within request_read_timeout_s")
_TOO_LARGE = _error("the body exceeds max_body_bytes")


def _generation(operation_id: str, request: str, answer: str, what: str) -> dict[str, Any]:
    """POST /v1/completions and /v1/chat/completions: the same statuses, other shapes."""
    ok = _json(f"{what}; `text/event-stream` when `stream` is true", ref(answer))
    ok["content"]["text/event-stream"] = {"schema": _sse(f"one event;  {_SSE_FRAMES}")}
    busy = _error("the request queue is full; retry shortly")
    busy["headers"] = {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return {
        "post": {
            "operationId": operation_id,
            "security": _KEYED,
            "requestBody": {"required": True, "content": {_JSON: {"schema": ref(request)}}},
            "responses": {
                "200": ok,
                "400": _error(
                    "invalid request: malformed JSON, an unknown field, a value out of range, "
                    "a limit exceeded"
                ),
                "401": _UNAUTHORIZED,
                "404": _error("no such model"),
                "408": _TOO_SLOW,
                "413": _TOO_LARGE,
                "429": busy,
                "503": _error(
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
            "security": _KEYED,
            "summary": f"{what} (vLLM's endpoint and shapes; docs/api.md)",
            "requestBody": {"required": True, "content": {_JSON: {"schema": ref(request)}}},
            "responses": {
                "200": _json(what, ref(answer)),
                "400": _error(
                    "invalid request: malformed JSON, an unknown field, a wrong type, a prompt "
                    "over the completions' limits, a token id outside the vocabulary, more ids "
                    "than max_model_len"
                ),
                "401": _UNAUTHORIZED,
                "404": _error("no such model"),
                "408": _TOO_SLOW,
                "413": _TOO_LARGE,
                "429": _error("the vllm engine only: too many requests in flight"),
                "502": _error("the vllm engine only: vLLM failed the request"),
                "503": _error("not ready (booting, or the engine stopped), or shutting down"),
            },
        }
    }


def _paths() -> dict[str, Any]:
    e2e_ok = _json(
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
                    "200": _json("alive", _obj(["status"], {"status": _const("string", "ok")}))
                },
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "readiness: completions can be served",
                "responses": {
                    "200": _json(
                        "ready",
                        _obj(
                            ["ready", "phase", "model"],
                            {"ready": _const("boolean", True), "phase": _STRING, "model": _STRING},
                        ),
                    ),
                    "503": _json(
                        "alive but not ready (attesting, loading, failed)",
                        _obj(
                            ["ready", "phase", "reason"],
                            {
                                "ready": _const("boolean", False),
                                "phase": _STRING,
                                "reason": _STRING,
                            },
                        ),
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "security": _KEYED,
                "summary": "Prometheus metrics (docs/metrics.md): an API key when keys are "
                "configured, else loopback peers only",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": _STRING}},
                    },
                    "401": _UNAUTHORIZED,
                    "403": _error("no API keys are configured and the peer is not loopback"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "this description",
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "security": _KEYED,
                "summary": "the served model (empty until boot is done)",
                "responses": {
                    "200": _json(
                        "the model list",
                        _obj(
                            ["object", "data"],
                            {
                                "object": _const("string", "list"),
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
                "security": _KEYED,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": _STRING}
                ],
                "responses": {
                    "200": _json("the model", ref("Model")),
                    "404": _error("no such model"),
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
                "security": _OPEN,
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
                    "200": _json("the quote and the service key", ref("Attestation")),
                    "400": _error("nonce missing or not 16..64 bytes of hex"),
                    "503": _error(
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
                "security": _OPEN,
                "summary": "the receipt attestation: the quote every answer's receipt is signed "
                "under, for the fixed receipts nonce (docs/api.md#receipts)",
                "responses": {
                    "200": _json(
                        "the /v1/attestation answer for the receipts nonce, with collateral "
                        "fetched now",
                        ref("ReceiptAttestation"),
                    ),
                    "503": _error(
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
                "security": _OPEN,
                "summary": "tdllm-e2e/3: an HPKE-sealed chat completion request, the API key "
                "sealed inside (docs/api.md#end-to-end-encrypted-mode-tdllm-e2e3)",
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": ref("E2eRequest")}},
                },
                "responses": {
                    "200": e2e_ok,
                    "400": _error(
                        "the envelope is malformed or does not decrypt to this service key"
                    ),
                    "403": _error(
                        "end-to-end mode is unavailable under this service's protection profile "
                        "(split and obfuscated show prompts to the untrusted device)"
                    ),
                    "408": _TOO_SLOW,
                    "409": _error(
                        "a replayed envelope: this request encapsulation was already answered"
                    ),
                    "413": _TOO_LARGE,
                },
            }
        },
    }


# -- components -------------------------------------------------------------------------------

_PYTHON_TYPES = {"str": _STRING, "str | None": _nullable(_STRING)}


def _error_schema() -> dict[str, Any]:
    """OpenAI's error shape, from the fields of ApiError that its body carries."""
    fields = [f for f in dataclasses.fields(ApiError) if f.name != "status"]
    inner = {f.name: _PYTHON_TYPES[str(f.type)] for f in fields}
    return _obj(["error"], {"error": _obj(list(inner), inner)})


def _hoist(schema: Any, named: dict[str, dict[str, Any]]) -> Any:
    """`schema` with each sub-schema that *is* one of `named` (by identity) as a $ref."""
    for name, target in named.items():
        if schema is target:
            return ref(name)
    if isinstance(schema, dict):
        return {k: _hoist(v, named) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_hoist(v, named) for v in schema]
    return schema


# chat's top_logprobs (a number, not null) only beside logprobs: true (protocol._check_top_logprobs)
_TOP_NEEDS_LOGPROBS = {
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}


def _request_schemas() -> dict[str, Any]:
    """The request bodies, from the validator's own tables; messages and their text parts as
    components of their own."""
    message = _hoist({k: v for k, v in MESSAGE_SCHEMA.items()}, {"TextPart": TEXT_PART_SCHEMA})
    named = {"ChatMessage": MESSAGE_SCHEMA, "TextPart": TEXT_PART_SCHEMA}
    return {
        "TextPart": copy.deepcopy(TEXT_PART_SCHEMA),
        "ChatMessage": message,
        "CompletionRequest": _hoist(request_schema(COMPLETION_SPECS), named),
        "ChatCompletionRequest": _hoist(request_schema(CHAT_SPECS), named) | _TOP_NEEDS_LOGPROBS,
        "TokenizeCompletionRequest": request_schema(TOKENIZE_COMPLETION_SPECS),
        "TokenizeChatRequest": _hoist(request_schema(TOKENIZE_CHAT_SPECS), named),
        "DetokenizeRequest": request_schema(DETOKENIZE_SPECS),
    }


def _logprobs(answer_name: str) -> dict[str, Any]:
    """A choice's logprobs (null unless asked, as the logprobs_policy allows): chat's OpenAI
    shape, or the legacy completions shape."""
    number = {"type": "number"}
    if answer_name == "text":
        listed = {"type": "array", "items": _STRING}
        top = {"type": "object", "additionalProperties": number}
        fields = ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
        legacy = {
            "tokens": listed,
            "token_logprobs": {"type": "array", "items": number},
            "top_logprobs": {"type": "array", "items": top},
            "text_offset": {"type": "array", "items": _INTEGER},
        }
        return _nullable(_obj(fields, legacy))
    token = {
        "token": _STRING,
        "logprob": number,
        "bytes": {"type": "array", "items": _INTEGER},
    }
    item = _obj(
        [*token, "top_logprobs"],
        token | {"top_logprobs": {"type": "array", "items": _obj(list(token), token)}},
    )
    return _nullable(_obj(["content"], {"content": {"type": "array", "items": item}}))


def _choices(answer: dict[str, Any], answer_name: str) -> dict[str, Any]:
    item = _obj(
        ["index", answer_name, "logprobs", "finish_reason"],
        {
            "index": _INTEGER,
            answer_name: answer,
            "logprobs": _logprobs(answer_name),
            "finish_reason": _described(
                {"type": "string", "enum": ["stop", "length", "tool_calls"]},
                "tool_calls: a chat answer that called tools (and stopped)",
            ),
        },
    )
    # n per prompt, in index order (a stream's chunks carry one choice each)
    return {"type": "array", "minItems": 1, "items": item}


def _answer(kind: str, answer: dict[str, Any], answer_name: str) -> dict[str, Any]:
    return _obj(
        ["id", "object", "created", "model", "choices", "usage"],
        {
            "id": _STRING,
            "created": _INTEGER,
            "model": _STRING,
            "object": _const("string", kind),
            "choices": _choices(answer, answer_name),
            "usage": ref("Usage"),
            "tdllm_receipt": ref("Receipt"),
        },
    )


def _tool_call() -> dict[str, Any]:
    """A call in a chat answer (docs/api.md, "Tool calls on the tdllm engine")."""
    function = _obj(
        ["name", "arguments"],
        {"name": _STRING, "arguments": _described(_STRING, "the arguments as a JSON object")},
    )
    return _obj(
        ["id", "type", "function"],
        {"id": _STRING, "type": _const("string", "function"), "function": function},
    )


def _described(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return schema | {"description": description}


_NULLABLE_STRING = _nullable(_STRING)


def _attestation() -> dict[str, Any]:
    sealed = _obj(
        ["format", "manifest_sha256", "model_id"],
        {"format": _STRING, "manifest_sha256": _STRING, "model_id": _STRING},
    )
    model = _obj(["id", "sealed"], {"id": _STRING, "sealed": _nullable(sealed)})
    properties = {
        "protocol": _STRING,
        "nonce": _STRING,
        "service_public_key": _described({"type": "object"}, "JWK (OKP, X25519)"),
        "signing_public_key": _described(
            {"type": "object"}, "JWK (OKP, Ed25519): signs every end-to-end answer"
        ),
        "report_data": _STRING,
        "quote": _described(_STRING, "base64url"),
        "collateral": {},
        "event_log": _described(
            _NULLABLE_STRING,
            "the runtime (RTMR3) event log, JSON text as `tdllm-verify --runtime-log` reads it",
        ),
        "profile": _described(
            _STRING,
            "the protection profile (td-only, split, masked, obfuscated); bound by REPORTDATA",
        ),
        "model": _described(
            _nullable(model),
            "the served model's identity (null until the engine runs); bound by REPORTDATA",
        ),
        "reference_values_id": _NULLABLE_STRING,
        "simulated": _BOOLEAN,
        "warning": _STRING,
    }
    return _obj([k for k in properties if k != "warning"], properties)


def _receipt() -> dict[str, Any]:
    body = {
        "schema": _const("string", "tdllm-receipt/1"),
        "time": _described(_STRING, "the TD's clock, UTC, YYYY-MM-DDTHH:MM:SS.ffffffZ"),
        "endpoint": _STRING,
        "stream": _BOOLEAN,
        "request_sha256": _described(_STRING, "hex SHA-256 of the exact request body"),
        "response_sha256": _described(
            _STRING, "hex SHA-256 of canonical JSON of the answer without its receipt"
        ),
        "sampling": {"type": "object"},
        "model": {},
        "profile": _STRING,
        "reference_values_id": _NULLABLE_STRING,
        "attestation": _obj(
            ["quote_sha256", "tcb_status"], {"quote_sha256": _STRING, "tcb_status": _STRING}
        ),
    }
    return _obj(
        ["receipt", "signature"],
        {"receipt": _obj(list(body), body), "signature": _described(_STRING, "base64url")},
        description='tdllm-receipt/1: Ed25519 by the attested signing key over b"tdllm-receipt/1'
        '\\0" || canonical_json(receipt) (docs/api.md#receipts)',
    )


def _schemas() -> dict[str, Any]:
    tdllm = _obj(
        ["profile", "device", "k", "engine", "logprobs"],
        {
            "profile": _STRING,
            "device": {"type": ["string", "null"]},
            "k": {"type": ["integer", "null"]},
            "engine": {"type": "string", "enum": ["tdllm", "vllm"]},
            "logprobs": _described(_STRING, 'the logprobs_policy: "off" or "top-k:N"'),
        },
        description="how the model is protected (docs/security.md): profile, untrusted device "
        "and private tail length K (null for td-only), the engine that runs it "
        "(docs/vllm.md) and the logprobs it gives (docs/api.md)",
    )
    count = {"type": "integer", "minimum": 0}
    usage = ["prompt_tokens", "completion_tokens", "total_tokens"]
    assistant = _obj(
        ["role", "content"],
        {
            "role": _const("string", "assistant"),
            "content": _described(_NULLABLE_STRING, "null when the answer is only tool calls"),
            "tool_calls": {"type": "array", "minItems": 1, "items": _tool_call()},
        },
    )
    requests = _request_schemas()
    return {
        "Error": _error_schema(),
        "Usage": _obj(usage, dict.fromkeys(usage, count)),
        "Model": _obj(
            ["id", "object", "created", "owned_by", "max_model_len", "tdllm"],
            {
                "id": _STRING,
                "object": _const("string", "model"),
                "created": _INTEGER,
                "owned_by": _STRING,
                "max_model_len": _described(count, "prompt and completion tokens together"),
                "tdllm": tdllm,
            },
        ),
        "TextPart": requests["TextPart"],
        "ChatMessage": requests["ChatMessage"],
        "CompletionRequest": requests["CompletionRequest"],
        "ChatCompletionRequest": requests["ChatCompletionRequest"],
        "TokenizeCompletionRequest": requests["TokenizeCompletionRequest"],
        "TokenizeChatRequest": requests["TokenizeChatRequest"],
        "TokenizeRequest": _described(
            {"oneOf": [ref("TokenizeCompletionRequest"), ref("TokenizeChatRequest")]},
            "text (`prompt`) or a conversation (`messages`, the chat template applied)",
        ),
        "DetokenizeRequest": requests["DetokenizeRequest"],
        "TokenizeResponse": _obj(
            ["count", "max_model_len", "tokens", "token_strs"],
            {
                "count": count,
                "max_model_len": _described(count, "as GET /v1/models states it"),
                "tokens": {"type": "array", "items": count},
                "token_strs": _described(
                    _nullable({"type": "array", "items": _STRING}),
                    "the tokens' vocabulary strings; null unless return_token_strs is true",
                ),
            },
        ),
        "DetokenizeResponse": _obj(["prompt"], {"prompt": _STRING}),
        "Completion": _answer("text_completion", _STRING, "text"),
        "ChatCompletion": _answer("chat.completion", assistant, "message"),
        "Attestation": _attestation(),
        "E2eRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["enc", "ciphertext"],
            "properties": {
                "enc": _described(_STRING, "base64url HPKE encapsulated key"),
                "ciphertext": _described(_STRING, "base64url"),
            },
        },
        "E2eResponse": _obj(
            ["salt", "nonce", "ciphertext", "signature"],
            {
                "salt": _described(
                    _STRING,
                    "base64url 32 random bytes of the server: the answer's keys are "
                    "HKDF(exporter secret, salt)",
                ),
                "nonce": _STRING,
                "ciphertext": _STRING,
                "signature": _described(
                    _STRING, "base64url Ed25519 signature by the attested signing key"
                ),
            },
        ),
        "Receipt": _receipt(),
        "ReceiptAttestation": {
            "allOf": [
                ref("Attestation"),
                _obj(
                    ["quote_sha256", "tcb_status"],
                    {
                        "quote_sha256": _described(
                            _STRING, "hex SHA-256 of the quote (unsigned convenience)"
                        ),
                        "tcb_status": _described(
                            _STRING,
                            'the TD\'s own verification of its quote, or "unverified" '
                            "(unsigned convenience)",
                        ),
                    },
                ),
            ]
        },
    }


def build() -> dict[str, Any]:
    """A fresh copy of the whole document (JSON-ready: dicts, lists, strings, numbers)."""
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "tdllm service",
            "version": __version__,
            "description": "The in-TD inference service (`tdllm serve`): an OpenAI-compatible "
            "subset, client attestation and the end-to-end encrypted mode. See docs/api.md.",
        },
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "only when API keys are configured; /health and /ready stay "
                    "open, /metrics then needs a key too",
                }
            },
            "schemas": _schemas(),
        },
    }
    # the helpers share sub-dicts (one _UNAUTHORIZED for every path): no caller may alias them
    return copy.deepcopy(doc)
