"""Request bodies of the OpenAI API we serve: parsing and validation into frozen dataclasses.

Fields the OpenAI API documents are accepted (clients send `user`, `metadata`, penalties set to
0, ...); a documented field we cannot honour with the value given is a 400 naming it; a field
OpenAI does not document at all is a 400 too, so a typo never silently changes a request.

Each body's fields are one table of `FieldSpec`s (`request_fields`, which the OpenAPI document
is built from too). The parsers here check a body against its table, field by field in the
table's order: generically where the spec holds its refusal, else with the field's own check
(`_CHECKS`); then they build the request from the checked body.

Bodies are decoded strictly first (`strict_json`); the request schemas are checked with
`json_schema.conforms`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tdllm.api.errors import ApiError, invalid
from tdllm.api.openai.chat_messages import parse_messages
from tdllm.api.openai.json_schema import conforms, is_int, is_number
from tdllm.api.openai.logprobs import requested as requested_logprobs
from tdllm.api.openai.request_fields import (
    CHAT_FIELDS,
    CHAT_ONLY_SPECS,
    COMMON_SPECS,
    COMPLETION_FIELDS,
    COMPLETION_ONLY_SPECS,
    DETOKENIZE_FIELDS,
    DETOKENIZE_SPECS,
    TOKENIZE_CHAT_FIELDS,
    TOKENIZE_CHAT_SPECS,
    TOKENIZE_COMPLETION_FIELDS,
    TOKENIZE_COMPLETION_SPECS,
    TOP_P_MAX,
    FieldSpec,
)
from tdllm.api.openai.strict_json import decode_body
from tdllm.api.openai.tools import (
    ToolUse,
    check_named_definition,
    check_tool_choice,
    check_tools,
    tool_use,
)
from tdllm.engine.sampling import MAX_LOGPROBS
from tdllm.engine.structured import json_grammar

# response_format's kinds, as its schema (request_fields.RESPONSE_FORMAT_SCHEMA) lists them
_FORMAT_TYPES = ("text", "json_object", "json_schema")


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
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids not yet range-checked
    min_tokens: int = 0
    max_tokens_param: str = "max_tokens"  # the name the client gave it (chat: either)
    grammar: str | None = None  # response_format's (engine.structured), not yet tokenizer-checked
    grammar_param: str = "response_format.json_schema.schema"  # where the grammar came from
    logprobs: int | None = None  # alternatives per token asked for; None: no logprobs


@dataclass(frozen=True)
class CompletionRequest:
    sampling: Sampling
    prompts: tuple[str | tuple[int, ...], ...]  # one or more, each text or token ids


@dataclass(frozen=True)
class ChatRequest:
    sampling: Sampling
    messages: tuple[dict[str, str], ...]
    tools: ToolUse | None = None  # None: no tools offered


@dataclass(frozen=True)
class TokenizeRequest:
    """POST /tokenize: text (`prompt`) or a conversation (`messages`), never both."""

    model: str | None  # None: the served model
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool
    tools: tuple[dict[str, Any], ...] = ()  # written into the conversation as chat offers them


@dataclass(frozen=True)
class DetokenizeRequest:
    model: str | None
    tokens: tuple[int, ...]


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    _check_specs(body, COMPLETION_ONLY_SPECS)
    _check_specs(body, COMMON_SPECS)
    return CompletionRequest(_sampling(body), _prompts(body.get("prompt")))


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    _check_fields(body, CHAT_FIELDS)
    _check_specs(body, CHAT_ONLY_SPECS)
    _check_specs(body, COMMON_SPECS)
    tools = tool_use(body)
    sampling = _sampling(body)
    if tools is not None and tools.grammar is not None:  # required or named: calls constrained
        sampling = replace(sampling, grammar=tools.grammar, grammar_param="tools")
    return ChatRequest(sampling, parse_messages(body.get("messages")), tools)


def parse_tokenize(body: dict[str, Any]) -> TokenizeRequest:
    """vLLM's two tokenize bodies: one with `messages` is a conversation (the chat template
    applied; special tokens not added by default, the template has them), any other is text
    (special tokens added by default, as a completion's prompt is encoded)."""
    if "messages" not in body:
        _check_fields(body, TOKENIZE_COMPLETION_FIELDS)
        _check_specs(body, TOKENIZE_COMPLETION_SPECS)
        return TokenizeRequest(
            body.get("model"),
            body["prompt"],
            None,
            body.get("add_special_tokens") is not False,
            False,
            body.get("return_token_strs") is True,
        )
    if "prompt" in body:
        raise invalid("unrecognized request argument: prompt (give prompt or messages)", "prompt")
    _check_fields(body, TOKENIZE_CHAT_FIELDS)
    _check_specs(body, TOKENIZE_CHAT_SPECS)
    return TokenizeRequest(
        body.get("model"),
        None,
        parse_messages(body.get("messages")),
        body.get("add_special_tokens") is True,
        body.get("add_generation_prompt") is not False,
        body.get("return_token_strs") is True,
        tuple(body.get("tools") or ()),
    )


def parse_detokenize(body: dict[str, Any]) -> DetokenizeRequest:
    _check_fields(body, DETOKENIZE_FIELDS)
    _check_specs(body, DETOKENIZE_SPECS)
    return DetokenizeRequest(body.get("model"), tuple(body["tokens"]))


# -- the checks of the tables -----------------------------------------------------------------


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unrecognized request argument: {unknown[0]}", unknown[0])


def _check_specs(body: dict[str, Any], specs: tuple[FieldSpec, ...]) -> None:
    """Check each field of `specs` in order: generically where the spec holds its refusal."""
    for spec in specs:
        if spec.refusal is None:
            check = _CHECKS.get(spec.name)
            if check is not None:
                check(body)
            continue
        if spec.name not in body:
            ok = not spec.required
        else:
            value = body[spec.name]
            ok = (value is None and spec.nullable) or conforms(spec.schema, value)
        if not ok:
            raise invalid(spec.refusal, spec.name, spec.code)


def _check_metadata(body: dict[str, Any]) -> None:
    metadata = _optional(body, "metadata", dict, None)
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise invalid("metadata values must be strings", "metadata")


def _check_max_completion_tokens(body: dict[str, Any]) -> None:
    value = body.get("max_completion_tokens")
    if value is None:
        return
    if not (is_int(value) and value >= 1):
        raise invalid("max_completion_tokens must be a positive integer", "max_completion_tokens")
    other = body.get("max_tokens")  # its own value is checked with the common fields
    if is_int(other) and other != value:
        raise invalid(
            f"max_tokens ({other}) and max_completion_tokens ({value}) differ: give one of them "
            "(or the same value)",
            "max_completion_tokens",
        )


def _check_stream_options(body: dict[str, Any]) -> None:
    options = body.get("stream_options")
    if options is None:
        return
    if body.get("stream") is not True:
        raise invalid("stream_options needs stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options may hold only include_usage", "stream_options")
    _optional(options, "include_usage", bool, False, "stream_options")


def _check_top_logprobs(body: dict[str, Any]) -> None:
    value = body.get("top_logprobs")
    if value is None:
        return
    if not (is_int(value) and 0 <= value <= MAX_LOGPROBS):
        raise invalid(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
    if body.get("logprobs") is not True:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")


def _check_top_p(body: dict[str, Any]) -> None:
    if _number(body, "top_p", 1.0, 0, TOP_P_MAX) == 0.0:
        raise invalid("top_p must be greater than 0", "top_p")


def _check_response_format(body: dict[str, Any]) -> None:
    """Its shape, each mistake named by its path; the schema itself is compiled in `_sampling`
    (`_response_grammar`)."""
    value = body.get("response_format")
    if value is None:
        return
    kinds = ", ".join(repr(k) for k in _FORMAT_TYPES)
    if not isinstance(value, dict) or value.get("type") not in _FORMAT_TYPES:
        raise invalid(
            f"response_format must be an object whose type is one of {kinds}", "response_format"
        )
    kind = value["type"]
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(value) - allowed)
    if extra:
        raise invalid(
            f"unrecognized field of response_format: {extra[0]}", f"response_format.{extra[0]}"
        )
    if kind != "json_schema":
        return
    spec = value.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise invalid(f"{param} must be an object with name and schema", param)
    check_named_definition(spec, param, ("name", "description", "schema", "strict"))
    if not isinstance(spec.get("schema"), dict):
        raise invalid(f"{param}.schema must be a JSON Schema (an object)", f"{param}.schema")


def _response_grammar(body: dict[str, Any]) -> str | None:
    """The grammar a checked response_format asks for (None: free text); a schema the grammar
    library cannot take is a 400 naming response_format.json_schema.schema and its reason."""
    value = body.get("response_format")
    if value is None or value["type"] == "text":
        return None
    schema = value["json_schema"]["schema"] if value["type"] == "json_schema" else None
    param = "response_format.json_schema.schema"
    try:
        return json_grammar(schema)
    except Exception as exc:  # the library's reason, whatever it raised
        raise invalid(f"{param} is not usable: {' '.join(str(exc).split())}", param) from None


# the fields whose specs hold no refusal, checked at their place in the table
_CHECKS = {
    "tools": check_tools,
    "tool_choice": check_tool_choice,
    "response_format": _check_response_format,
    "metadata": _check_metadata,
    "max_completion_tokens": _check_max_completion_tokens,
    "stream_options": _check_stream_options,
    "top_p": _check_top_p,
    "top_logprobs": _check_top_logprobs,
}


def _sampling(body: dict[str, Any]) -> Sampling:
    """The sampling fields of a body that `_check_specs` has checked against COMMON_SPECS."""
    options = body.get("stream_options") or {}
    stop = body.get("stop")
    given = body.get("max_completion_tokens")  # chat's name for it (checked against max_tokens)
    max_tokens_param = "max_tokens" if given is None else "max_completion_tokens"
    bias = body.get("logit_bias") or {}

    def number(name: str, default: float) -> float:
        value = body.get(name)
        return default if value is None else float(value)

    return Sampling(
        model=body["model"],
        max_tokens=body.get(max_tokens_param),
        temperature=number("temperature", 1.0),
        top_p=number("top_p", 1.0),
        seed=body.get("seed"),
        stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        stream=body.get("stream") is True,
        include_usage=options.get("include_usage") is True,
        n=body.get("n") or 1,
        presence_penalty=number("presence_penalty", 0.0),
        frequency_penalty=number("frequency_penalty", 0.0),
        repetition_penalty=number("repetition_penalty", 1.0),
        logit_bias=tuple((int(token), float(value)) for token, value in bias.items()),
        min_tokens=body.get("min_tokens") or 0,
        max_tokens_param=max_tokens_param,
        grammar=_response_grammar(body),
        logprobs=requested_logprobs(body),
    )


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """`prompt` as a list of prompts: text, token ids, or a non-empty list of either."""
    if isinstance(value, str):
        if not value:
            raise invalid("prompt is empty", "prompt")
        return (value,)
    if isinstance(value, list) and value:
        if all(is_int(t) and t >= 0 for t in value):
            return (tuple(value),)
        if all(isinstance(p, str) for p in value):
            for i, p in enumerate(value):
                if not p:
                    raise invalid(f"prompt[{i}] is empty", "prompt")
            return tuple(value)
        if all(isinstance(p, list) and p and all(is_int(t) and t >= 0 for t in p) for p in value):
            return tuple(tuple(p) for p in value)
    raise invalid(
        "prompt must be a non-empty string, a non-empty list of token ids (integers >= 0), or "
        "a non-empty list of either",
        "prompt",
    )


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
    if not is_number(value) or not (low <= value <= high):
        raise invalid(f"{name} must be a number in [{low:g}, {high:g}]", name)
    return float(value)


__all__ = [
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "Sampling",
    "TokenizeRequest",
    "conforms",
    "decode_body",
]
