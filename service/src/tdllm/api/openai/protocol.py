"""Request bodies of the OpenAI API we serve: parsing and validation into frozen dataclasses.

Fields the OpenAI API documents are accepted (clients send `user`, `metadata`, penalties set to
0, ...); a documented field we cannot honour with the value given is a 400 naming it; a field
OpenAI does not document at all is a 400 too, so a typo never silently changes a request.

Logprobs are refused on purpose: returning (even top-k) log probabilities for every generated
token leaks enough of the output distribution to reconstruct the model's last layer (Carlini et
al., "Stealing Part of a Production Language Model", 2024), and the weights are what the
appliance protects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tdllm.api.openai.errors import ApiError, invalid
from tdllm.engine.sampling import MAX_STOP_STRINGS

MAX_SEED = (1 << 63) - 1
MAX_MESSAGES = 256
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "metadata",
    "store",
    "service_tier",
    "modalities",
    "reasoning_effort",
}
LOGPROBS_REFUSED = (
    "logprobs are not offered: per-token probabilities let a client reconstruct the model's "
    "last layer, and the weights are what this appliance protects"
)


@dataclass(frozen=True)
class Sampling:
    """What both endpoints share: limits and sampling knobs, already validated."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class CompletionRequest:
    sampling: Sampling
    prompt: str | tuple[int, ...]


@dataclass(frozen=True)
class ChatRequest:
    sampling: Sampling
    messages: tuple[dict[str, str], ...]


def decode_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (never a 500 for bad bytes)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    _refuse_unless(body, "echo", lambda v: v in (None, False), "echo is not supported")
    _refuse_unless(body, "best_of", lambda v: v in (None, 1), "best_of must be 1")
    _refuse_unless(body, "suffix", lambda v: v in (None, ""), "suffix is not supported")
    _refuse_unless(body, "logprobs", lambda v: v is None, LOGPROBS_REFUSED)
    return CompletionRequest(_sampling(body, "max_tokens"), _prompt(body.get("prompt")))


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    _check_fields(body, CHAT_FIELDS)
    _refuse_unless(body, "logprobs", lambda v: v in (None, False), LOGPROBS_REFUSED)
    _refuse_unless(body, "top_logprobs", lambda v: v is None, LOGPROBS_REFUSED)
    for name in ("tools", "functions"):
        _refuse_unless(body, name, lambda v: v in (None, []), f"{name} are not supported")
    for name in ("tool_choice", "function_call"):
        _refuse_unless(body, name, lambda v: v in (None, "none"), f"{name} is not supported")
    _refuse_unless(
        body,
        "response_format",
        lambda v: v is None or v == {"type": "text"},
        "only response_format {'type': 'text'} is supported",
    )
    _refuse_unless(body, "store", lambda v: v in (None, False), "store is not supported")
    _refuse_unless(
        body, "modalities", lambda v: v in (None, ["text"]), "only text modality is supported"
    )
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
        body = body | {"max_tokens": body["max_completion_tokens"]}
    return ChatRequest(_sampling(body, "max_tokens"), _messages(body.get("messages")))


# -- shared fields ----------------------------------------------------------------------------


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unrecognized request argument: {unknown[0]}", unknown[0])


def _refuse_unless(body: dict[str, Any], name: str, ok: Any, message: str) -> None:
    if name in body and not ok(body[name]):
        raise invalid(message, name, "unsupported_parameter")


def _sampling(body: dict[str, Any], max_name: str) -> Sampling:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required (a string; see GET /v1/models)", "model")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid("n must be 1 (one choice per request)", "n", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or value != 0):
            raise invalid(f"{name} is not supported (only 0)", name, "unsupported_parameter")
    bias = body.get("logit_bias")
    if bias not in (None, {}):
        raise invalid("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", "user")
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options needs stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options may hold only include_usage", "stream_options")
        include_usage = _optional(options, "include_usage", bool, False, "stream_options")
    max_tokens = body.get(max_name)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise invalid("max_tokens must be a positive integer", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise invalid("top_p must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not (0 <= seed <= MAX_SEED)):
        raise invalid(f"seed must be an integer in [0, {MAX_SEED}]", "seed")
    return Sampling(
        model, max_tokens, temperature, top_p, seed, _stop(body.get("stop")), stream, include_usage
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or len(items) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in items)
    ):
        raise invalid(f"stop must be a string or a list of at most {MAX_STOP_STRINGS}", "stop")
    return tuple(items)


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise invalid("prompt is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(t) and t >= 0 for t in value):
        return tuple(value)
    raise invalid(
        "prompt must be a non-empty string or a list of token ids (one prompt per request)",
        "prompt",
    )


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_MESSAGES:
        raise invalid(f"messages must be a list of 1..{MAX_MESSAGES} messages", "messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise invalid(f"{param} must be an object with role and content", param)
        role_name = message.get("role")
        # a list or object role is unhashable: it must be a 400, not a TypeError (a 500)
        role = CHAT_ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            raise invalid(f"{param}.role must be one of {', '.join(CHAT_ROLES)}", param)
        out.append({"role": role, "content": _content(message.get("content"), param)})
    return tuple(out)


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{param}.content: only text parts are supported", param)
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{param}.content: a text part needs text", param)
            parts.append(text)
        return "".join(parts)
    raise invalid(f"{param}.content must be a string or a list of text parts", param)


def _optional(body: dict[str, Any], name: str, kind: type, default: Any, param: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise invalid(f"{name} must be a {kind.__name__}", param or name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not (low <= value <= high):
        raise invalid(f"{name} must be a number in [{low:g}, {high:g}]", name)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Sampling", "decode_body"]
