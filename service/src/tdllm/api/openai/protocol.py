"""Request bodies of the OpenAI API we serve: parsing and validation into frozen dataclasses.

Fields the OpenAI API documents are accepted (clients send `user`, `metadata`, penalties set to
0, ...); a documented field we cannot honour with the value given is a 400 naming it; a field
OpenAI does not document at all is a 400 too, so a typo never silently changes a request.

Logprobs are refused on purpose: returning (even top-k) log probabilities for every generated
token leaks enough of the output distribution to reconstruct the model's last layer (Carlini et
al., "Stealing Part of a Production Language Model", 2024), and the weights are what the
appliance protects.

Bodies are decoded strictly (docs/api.md, "Malformed input"): UTF-8 only, so overlong forms,
truncated sequences and encoded surrogates are refused before JSON parsing; every string (keys
too) must be Unicode text without NUL, since a lone surrogate cannot be encoded for the tokenizer
and NUL is where C-string consumers of a prompt truncate; nesting is bounded (no OpenAI request
goes deeper than 5 levels, and Python's recursion limit must never be what stops a body);
numbers are finite and integers at most 20 digits (nothing here takes more than 64 bits, and
Python's int-string limit would otherwise decide); a key twice in one object is refused, so no
two parsers of one body can read different requests. The same rules apply to the request inside
an end-to-end envelope (`check_json`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tdllm.api.openai.errors import ApiError, invalid
from tdllm.engine.sampling import MAX_STOP_STRINGS

MAX_SEED = (1 << 63) - 1
MAX_MESSAGES = 256
MAX_JSON_DEPTH = 32  # the top-level object is level 1; OpenAI's deepest request needs 5
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; no field takes more
_INT_LIMIT = 10**MAX_INT_DIGITS
_LONG_DIGITS = re.compile(f"[0-9]{{{MAX_INT_DIGITS + 1}}}")
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates (text only in pairs)
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
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def decode_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON within the limits of `check_json`; an `ApiError` (400) otherwise."""
    try:
        # bytes to json.loads would be decoded with 'surrogatepass' and UTF-16/32 sniffed
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the request body is not valid UTF-8") from None
    hooks: dict[str, Any] = {"object_pairs_hook": _object}
    if _LONG_DIGITS.search(text):  # maybe a long integer: length-check literals before int()
        hooks["parse_int"] = _integer
    try:
        value = json.loads(text, **hooks)
    except _DuplicateKeyError:
        raise invalid("the request body repeats a key in one object (duplicate key)") from None
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: the parser gave up first
        raise invalid(_too_deep()) from None
    except ValueError:  # also the BOM of UTF-8, which RFC 8259 forbids senders to add
        raise invalid("the request body is not valid JSON") from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """Refuse what `decode_json` refuses in an already parsed value (a 400 naming its path).

    Iterative, so that a value nested deeper than Python's recursion limit is refused too;
    scalars are checked inline and a path is built only for the error (bodies of a MiB).
    """
    if not isinstance(value, dict | list):
        _check_scalar(value, ())
        return
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise invalid(_too_deep(), _param(path[:1]))
        if isinstance(node, list) and all(type(item) is int for item in node):
            if node and not -_INT_LIMIT < min(node) <= max(node) < _INT_LIMIT:
                _check_scalar(next(i for i in node if abs(i) >= _INT_LIMIT), path)
            continue  # token ids: the common big list, checked at C speed
        for key, item in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(key, str) and _NOT_TEXT.search(key):
                _check_scalar(key, path)  # a bad key: the path of its object
            if isinstance(item, dict | list):
                stack.append((item, (*path, key)))
            elif not (
                item is None
                or item is True
                or item is False
                or (type(item) is str and not _NOT_TEXT.search(item))
                or (type(item) is int and -_INT_LIMIT < item < _INT_LIMIT)
                or (type(item) is float and math.isfinite(item))
            ):
                _check_scalar(item, (*path, key))


def _check_scalar(item: Any, path: tuple[str | int, ...]) -> None:
    """A 400 naming `path` if `item` is a string, number or parser marker this API refuses."""
    where = _param(path)
    if isinstance(item, str):
        bad = _NOT_TEXT.search(item)
        if bad is None:
            return
        if bad.group() == "\x00":
            problem = "holds a NUL character (U+0000), which is refused"
        else:
            problem = "holds a lone surrogate (U+D800..U+DFFF), which is not Unicode text"
        raise invalid(f"{where or 'a key of the request'} {problem}", where)
    if isinstance(item, float) and not math.isfinite(item):
        raise invalid("numbers must be finite (no NaN or Infinity)", where)
    if isinstance(item, _TooLong) or (type(item) is int and abs(item) >= _INT_LIMIT):
        raise invalid(f"integers have at most {MAX_INT_DIGITS} digits", where)


class _DuplicateKeyError(Exception):
    """A key twice in one object (raised from inside json.loads)."""


class _TooLong:
    """An integer literal longer than MAX_INT_DIGITS: `check_json` refuses it with its path."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKeyError
    return obj


def _integer(literal: str) -> int | _TooLong:
    # checked before int(): its cost grows with the square of the digits, and whether Python's
    # own limit (4300 digits, configurable) applies is not this module's to decide
    if len(literal) - literal.startswith("-") > MAX_INT_DIGITS:
        return _TooLong()
    return int(literal)


def _param(path: tuple[str | int, ...]) -> str | None:
    """OpenAI's param form of a path: messages[0].content."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}" if out else step
    return out or None


def _too_deep() -> str:
    return f"the request body nests more than {MAX_JSON_DEPTH} levels deep"


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    # `is`, not `in`: 0 == False and True == 1, but neither is what the description allows
    _refuse_unless(body, "echo", lambda v: v is None or v is False, "echo is not supported")
    _refuse_unless(
        body, "best_of", lambda v: v is None or (_is_int(v) and v == 1), "best_of must be 1"
    )
    _refuse_unless(body, "suffix", lambda v: v in (None, ""), "suffix is not supported")
    _refuse_unless(body, "logprobs", lambda v: v is None, LOGPROBS_REFUSED)
    return CompletionRequest(_sampling(body, "max_tokens"), _prompt(body.get("prompt")))


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    _check_fields(body, CHAT_FIELDS)
    _refuse_unless(body, "logprobs", lambda v: v is None or v is False, LOGPROBS_REFUSED)
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
    _refuse_unless(body, "store", lambda v: v is None or v is False, "store is not supported")
    _refuse_unless(
        body, "modalities", lambda v: v in (None, ["text"]), "only text modality is supported"
    )
    _optional(body, "parallel_tool_calls", bool, None)
    for name in ("service_tier", "reasoning_effort"):
        _optional(body, name, str, None)
    metadata = _optional(body, "metadata", dict, None)
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise invalid("metadata values must be strings", "metadata")
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
        if "name" in message and not isinstance(message["name"], str):
            raise invalid(f"{param}.name must be a string", f"{param}.name")
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
