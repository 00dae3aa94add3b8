"""The OpenAPI 3.1 description of this service, built in Python (GET /openapi.json serves it).

The request bodies come from the field tables the validator itself runs on
(`tdllm.api.openai.request_fields`: COMPLETION_SPECS, CHAT_SPECS; `chat_messages`:
MESSAGE_SCHEMA), and the error shape from `ApiError`, so neither can drift from the code that
enforces it. The rest is declared: the paths and their status codes in `openapi_paths`, the
answer shapes here. tests/api/test_openapi_document.py holds the paths to the app's routes and
the schemas to the validator, and tests/api/test_openapi_fuzz.py fuzzes the app against the
whole document (no 5xx, every answer documented).
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
from tdllm.api.openapi_paths import paths
from tdllm.api.openapi_schema_parts import (
    BOOLEAN,
    INTEGER,
    NULLABLE_STRING,
    STRING,
    const,
    described,
    nullable,
    obj,
    ref,
)

_PYTHON_TYPES = {"str": STRING, "str | None": nullable(STRING)}


def _error_schema() -> dict[str, Any]:
    """OpenAI's error shape, from the fields of ApiError that its body carries."""
    fields = [f for f in dataclasses.fields(ApiError) if f.name != "status"]
    inner = {f.name: _PYTHON_TYPES[str(f.type)] for f in fields}
    return obj(["error"], {"error": obj(list(inner), inner)})


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
        listed = {"type": "array", "items": STRING}
        top = {"type": "object", "additionalProperties": number}
        fields = ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
        legacy = {
            "tokens": listed,
            "token_logprobs": {"type": "array", "items": number},
            "top_logprobs": {"type": "array", "items": top},
            "text_offset": {"type": "array", "items": INTEGER},
        }
        return nullable(obj(fields, legacy))
    token = {
        "token": STRING,
        "logprob": number,
        "bytes": {"type": "array", "items": INTEGER},
    }
    item = obj(
        [*token, "top_logprobs"],
        token | {"top_logprobs": {"type": "array", "items": obj(list(token), token)}},
    )
    return nullable(obj(["content"], {"content": {"type": "array", "items": item}}))


def _choices(answer: dict[str, Any], answer_name: str) -> dict[str, Any]:
    item = obj(
        ["index", answer_name, "logprobs", "finish_reason"],
        {
            "index": INTEGER,
            answer_name: answer,
            "logprobs": _logprobs(answer_name),
            "finish_reason": described(
                {"type": "string", "enum": ["stop", "length", "tool_calls"]},
                "tool_calls: a chat answer that called tools (and stopped)",
            ),
        },
    )
    # n per prompt, in index order (a stream's chunks carry one choice each)
    return {"type": "array", "minItems": 1, "items": item}


def _answer(kind: str, answer: dict[str, Any], answer_name: str) -> dict[str, Any]:
    return obj(
        ["id", "object", "created", "model", "choices", "usage"],
        {
            "id": STRING,
            "created": INTEGER,
            "model": STRING,
            "object": const("string", kind),
            "choices": _choices(answer, answer_name),
            "usage": ref("Usage"),
            "tdllm_receipt": ref("Receipt"),
        },
    )


def _tool_call() -> dict[str, Any]:
    """A call in a chat answer (docs/api.md, "Tool calls on the tdllm engine")."""
    function = obj(
        ["name", "arguments"],
        {"name": STRING, "arguments": described(STRING, "the arguments as a JSON object")},
    )
    return obj(
        ["id", "type", "function"],
        {"id": STRING, "type": const("string", "function"), "function": function},
    )


def _attestation() -> dict[str, Any]:
    sealed = obj(
        ["format", "manifest_sha256", "model_id"],
        {"format": STRING, "manifest_sha256": STRING, "model_id": STRING},
    )
    model = obj(["id", "sealed"], {"id": STRING, "sealed": nullable(sealed)})
    properties = {
        "protocol": STRING,
        "nonce": STRING,
        "service_public_key": described({"type": "object"}, "JWK (OKP, X25519)"),
        "signing_public_key": described(
            {"type": "object"}, "JWK (OKP, Ed25519): signs every end-to-end answer"
        ),
        "report_data": STRING,
        "quote": described(STRING, "base64url"),
        "collateral": {},
        "event_log": described(
            NULLABLE_STRING,
            "the runtime (RTMR3) event log, JSON text as `tdllm-verify --runtime-log` reads it",
        ),
        "profile": described(
            STRING,
            "the protection profile (td-only, split, masked, obfuscated); bound by REPORTDATA",
        ),
        "model": described(
            nullable(model),
            "the served model's identity (null until the engine runs); bound by REPORTDATA",
        ),
        "reference_values_id": NULLABLE_STRING,
        "simulated": BOOLEAN,
        "warning": STRING,
    }
    return obj([k for k in properties if k != "warning"], properties)


def _receipt() -> dict[str, Any]:
    body = {
        "schema": const("string", "tdllm-receipt/1"),
        "time": described(STRING, "the TD's clock, UTC, YYYY-MM-DDTHH:MM:SS.ffffffZ"),
        "endpoint": STRING,
        "stream": BOOLEAN,
        "request_sha256": described(STRING, "hex SHA-256 of the exact request body"),
        "response_sha256": described(
            STRING, "hex SHA-256 of canonical JSON of the answer without its receipt"
        ),
        "sampling": {"type": "object"},
        "model": {},
        "profile": STRING,
        "reference_values_id": NULLABLE_STRING,
        "attestation": obj(
            ["quote_sha256", "tcb_status"], {"quote_sha256": STRING, "tcb_status": STRING}
        ),
    }
    return obj(
        ["receipt", "signature"],
        {"receipt": obj(list(body), body), "signature": described(STRING, "base64url")},
        description='tdllm-receipt/1: Ed25519 by the attested signing key over b"tdllm-receipt/1'
        '\\0" || canonical_json(receipt) (docs/api.md#receipts)',
    )


def _schemas() -> dict[str, Any]:
    tdllm = obj(
        ["profile", "device", "k", "engine", "logprobs"],
        {
            "profile": STRING,
            "device": {"type": ["string", "null"]},
            "k": {"type": ["integer", "null"]},
            "engine": {"type": "string", "enum": ["tdllm", "vllm"]},
            "logprobs": described(STRING, 'the logprobs_policy: "off" or "top-k:N"'),
        },
        description="how the model is protected (docs/security.md): profile, untrusted device "
        "and private tail length K (null for td-only), the engine that runs it "
        "(docs/vllm.md) and the logprobs it gives (docs/api.md)",
    )
    count = {"type": "integer", "minimum": 0}
    usage = ["prompt_tokens", "completion_tokens", "total_tokens"]
    assistant = obj(
        ["role", "content"],
        {
            "role": const("string", "assistant"),
            "content": described(NULLABLE_STRING, "null when the answer is only tool calls"),
            "tool_calls": {"type": "array", "minItems": 1, "items": _tool_call()},
        },
    )
    requests = _request_schemas()
    return {
        "Error": _error_schema(),
        "Usage": obj(usage, dict.fromkeys(usage, count)),
        "Model": obj(
            ["id", "object", "created", "owned_by", "max_model_len", "tdllm"],
            {
                "id": STRING,
                "object": const("string", "model"),
                "created": INTEGER,
                "owned_by": STRING,
                "max_model_len": described(count, "prompt and completion tokens together"),
                "tdllm": tdllm,
            },
        ),
        "TextPart": requests["TextPart"],
        "ChatMessage": requests["ChatMessage"],
        "CompletionRequest": requests["CompletionRequest"],
        "ChatCompletionRequest": requests["ChatCompletionRequest"],
        "TokenizeCompletionRequest": requests["TokenizeCompletionRequest"],
        "TokenizeChatRequest": requests["TokenizeChatRequest"],
        "TokenizeRequest": described(
            {"oneOf": [ref("TokenizeCompletionRequest"), ref("TokenizeChatRequest")]},
            "text (`prompt`) or a conversation (`messages`, the chat template applied)",
        ),
        "DetokenizeRequest": requests["DetokenizeRequest"],
        "TokenizeResponse": obj(
            ["count", "max_model_len", "tokens", "token_strs"],
            {
                "count": count,
                "max_model_len": described(count, "as GET /v1/models states it"),
                "tokens": {"type": "array", "items": count},
                "token_strs": described(
                    nullable({"type": "array", "items": STRING}),
                    "the tokens' vocabulary strings; null unless return_token_strs is true",
                ),
            },
        ),
        "DetokenizeResponse": obj(["prompt"], {"prompt": STRING}),
        "Completion": _answer("text_completion", STRING, "text"),
        "ChatCompletion": _answer("chat.completion", assistant, "message"),
        "Attestation": _attestation(),
        "E2eRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["enc", "ciphertext"],
            "properties": {
                "enc": described(STRING, "base64url HPKE encapsulated key"),
                "ciphertext": described(STRING, "base64url"),
            },
        },
        "E2eResponse": obj(
            ["salt", "nonce", "ciphertext", "signature"],
            {
                "salt": described(
                    STRING,
                    "base64url 32 random bytes of the server: the answer's keys are "
                    "HKDF(exporter secret, salt)",
                ),
                "nonce": STRING,
                "ciphertext": STRING,
                "signature": described(
                    STRING, "base64url Ed25519 signature by the attested signing key"
                ),
            },
        ),
        "Receipt": _receipt(),
        "ReceiptAttestation": {
            "allOf": [
                ref("Attestation"),
                obj(
                    ["quote_sha256", "tcb_status"],
                    {
                        "quote_sha256": described(
                            STRING, "hex SHA-256 of the quote (unsigned convenience)"
                        ),
                        "tcb_status": described(
                            STRING,
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
        "paths": paths(),
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
