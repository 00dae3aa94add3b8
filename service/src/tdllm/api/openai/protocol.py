"""Request bodies of the OpenAI API we serve: parsing and validation into frozen dataclasses.

Fields the OpenAI API documents are accepted (clients send `user`, `metadata`, penalties set to
0, ...); a documented field we cannot honour with the value given is a 400 naming it; a field
OpenAI does not document at all is a 400 too, so a typo never silently changes a request.

Each body's fields are one table of `FieldSpec`s (COMPLETION_SPECS, CHAT_SPECS): name, JSON
Schema, whether required, and the 400 for a value outside the schema. The parsers check bodies
against the tables, and the OpenAPI document's request schemas are built from the same tables
(tdllm.api.openapi_document), so what GET /openapi.json documents is what is accepted.

Logprobs are typed here; whether they are offered at all, and how many alternatives, is the
model owner's `logprobs_policy` (off by default: they help rebuild the model's last layers),
checked by `logprobs.check_logprobs` before the body is parsed.

Bodies are decoded strictly first (`strict_json`); the request schemas are checked with
`json_schema.conforms`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tdllm.api.errors import ApiError, invalid
from tdllm.api.openai.chat_messages import (
    MAX_MESSAGES,
    MESSAGE_FIELDS,
    MESSAGE_SCHEMA,
    TEXT_PART_SCHEMA,
    parse_messages,
)
from tdllm.api.openai.json_schema import conforms, is_int, is_number
from tdllm.api.openai.logprobs import requested as requested_logprobs
from tdllm.api.openai.strict_json import decode_body
from tdllm.api.openai.tools import (
    TOOL_CHOICE_SCHEMA,
    TOOL_NAME_PATTERN,
    TOOLS_SCHEMA,
    ToolUse,
    check_named_definition,
    check_tool_choice,
    check_tools,
    tool_use,
)
from tdllm.engine.sampling import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    PENALTY_RANGE,
    REPETITION_PENALTY_MAX,
)
from tdllm.engine.structured import json_grammar

MAX_SEED = (1 << 63) - 1
LOGPROBS_POLICY_NOTE = "only where the logprobs_policy setting allows (default off: a 400)"
TEMPERATURE_RANGE = (0, 2)
TOP_P_MAX = 1  # and greater than 0


# -- the request fields: one table per body, which both the parsers below and the OpenAPI
# document (tdllm.api.openapi_document) read ---------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One field of a request body: its JSON Schema and how a value outside it is refused.

    `schema` describes a present, non-null value, in the subset of JSON Schema that `conforms`
    reads (and the OpenAPI document publishes as is). With `refusal` set, the field is checked
    here, generically: a value that does not conform is a 400 with that message, `param` the
    field and `code` given. Without it, a function of its own checks it (`_CHECKS`, at its place
    in the table; prompt and messages last, as they are parsed): shapes that are converted, that
    depend on other fields or whose refusals name more than the field. The tests hold those to
    the schema value by value (tests/api/test_openapi_document.py).
    """

    name: str
    schema: dict[str, Any]
    refusal: str | None = None
    code: str | None = None
    required: bool = False
    nullable: bool = True  # null means "not given" (what the OpenAI clients send)
    description: str | None = None

    def json_schema(self) -> dict[str, Any]:
        """The property's schema in the OpenAPI document: null allowed where it is."""
        out = {"anyOf": [self.schema, {"type": "null"}]} if self.nullable else dict(self.schema)
        return out | ({"description": self.description} if self.description else {})


def _unsupported(name: str, schema: dict[str, Any], refusal: str) -> FieldSpec:
    """A documented field we can honour only with the values in `schema`."""
    return FieldSpec(name, schema, refusal, "unsupported_parameter")


def _typed(name: str, kind: str) -> FieldSpec:
    return FieldSpec(name, {"type": kind}, f"{name} must be a {_PYTHON_NAMES[kind]}")


def _penalty(name: str) -> FieldSpec:
    low, high = PENALTY_RANGE
    return FieldSpec(
        name,
        {"type": "number", "minimum": low, "maximum": high},
        f"{name} must be a number in [{low:g}, {high:g}]",
    )


_PYTHON_NAMES = {"boolean": "bool", "string": "str"}
_ONE_PROMPT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
ID_KEY_PATTERN = "^[0-9]{1,10}$"  # a token id as a JSON object's key

JSON_SCHEMA_NAME_PATTERN = TOOL_NAME_PATTERN  # OpenAI's one rule for named definitions
_FORMAT_TYPES = ("text", "json_object", "json_schema")
RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["type", "json_schema"],
            "properties": {
                "type": {"type": "string", "const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "schema"],
                    "properties": {
                        "name": {"type": "string", "pattern": JSON_SCHEMA_NAME_PATTERN},
                        "description": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                    },
                },
            },
        },
    ]
}

# chat's, and completions' too (vLLM's extension there): one grammar path for both endpoints;
# nested params in its refusals, the schema compiled: _check_response_format
RESPONSE_FORMAT_SPEC = FieldSpec(
    "response_format",
    RESPONSE_FORMAT_SCHEMA,
    description="text, json_object (any JSON object) or json_schema (JSON valid under "
    "json_schema.schema): constrained decoding, compact JSON; an invalid schema is a 400 (on "
    "completions too, as vLLM's extension)",
)

# Each table is in the order the fields are checked (so that of two mistakes in one body, the
# same one is always reported). Fields without a refusal are checked in that order too, by the
# parser named in their comment, or last (prompt, messages: parsed into the request).

COMPLETION_ONLY_SPECS: tuple[FieldSpec, ...] = (
    _unsupported("echo", {"type": "boolean", "const": False}, "echo is not supported"),
    _unsupported("best_of", {"type": "integer", "const": 1}, "best_of must be 1"),
    _unsupported("suffix", {"type": "string", "maxLength": 0}, "suffix is not supported"),
    FieldSpec(
        "logprobs",
        {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
        f"logprobs must be an integer in [0, {MAX_LOGPROBS}]",
        description="each token's logprob and this many most likely alternatives (the raw "
        f"model's); {LOGPROBS_POLICY_NOTE}, at most its top-k",
    ),
    RESPONSE_FORMAT_SPEC,
)

CHAT_ONLY_SPECS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "logprobs",
        {"type": "boolean"},
        "logprobs must be a bool",
        description=f"each token's logprob (the raw model's); true {LOGPROBS_POLICY_NOTE}",
    ),
    FieldSpec(  # needs logprobs: true, which no schema of one field says: _check_top_logprobs
        "top_logprobs",
        {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
        description="with logprobs: true, this many most likely alternatives per token; at most "
        "the logprobs_policy's top-k",
    ),
    FieldSpec(  # nested params in its refusals, each schema compiled: tools.check_tools
        "tools",
        TOOLS_SCHEMA,
        description="function tools the model may call (docs/api.md, Tool calls on the tdllm "
        "engine): names unique, each parameters a JSON Schema the grammar library compiles",
    ),
    _unsupported("functions", {"type": "array", "maxItems": 0}, "functions are not supported"),
    FieldSpec(  # a named function must be one of tools: tools.check_tool_choice
        "tool_choice",
        TOOL_CHOICE_SCHEMA,
        description="none, auto (the default with tools), required, or a named function; "
        "required and named calls are grammar-constrained to the tool's parameters",
    ),
    _unsupported(
        "function_call", {"type": "string", "const": "none"}, "function_call is not supported"
    ),
    RESPONSE_FORMAT_SPEC,
    _unsupported("store", {"type": "boolean", "const": False}, "store is not supported"),
    _unsupported(
        "modalities",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {"type": "string", "const": "text"},
        },
        "only text modality is supported",
    ),
    _typed("parallel_tool_calls", "boolean"),
    _typed("service_tier", "string"),
    _typed("reasoning_effort", "string"),
    FieldSpec(  # two messages (not an object, a value not a string): _check_metadata
        "metadata", {"type": "object", "additionalProperties": {"type": "string"}}
    ),
    FieldSpec(  # differing from max_tokens is a 400 too: _check_max_completion_tokens
        "max_completion_tokens",
        {"type": "integer", "minimum": 1},
        description="max_tokens' name in chat; with max_tokens too, the same value",
    ),
)

COMMON_SPECS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "model",
        {"type": "string", "minLength": 1},
        "model is required (a string; see GET /v1/models)",
        required=True,
        nullable=False,
        description="the served model's id (GET /v1/models); any other is a 404",
    ),
    FieldSpec(
        "n",
        {"type": "integer", "minimum": 1},
        "n must be a positive integer",
        description="choices per prompt: at most the max_n setting (prompts times n, too) and "
        "max_batch; with a seed, choice i samples with seed + i",
    ),
    _penalty("presence_penalty"),
    _penalty("frequency_penalty"),
    FieldSpec(
        "logit_bias",
        {
            "type": "object",
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": ID_KEY_PATTERN},
            "additionalProperties": {
                "type": "number",
                "minimum": LOGIT_BIAS_RANGE[0],
                "maximum": LOGIT_BIAS_RANGE[1],
            },
        },
        f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (strings of digits) to numbers "
        f"in [{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}]",
        description="token id -> bias added to its logit; ids in the vocabulary",
    ),
    FieldSpec("user", {"type": "string"}, "user must be a string"),
    _typed("stream", "boolean"),
    FieldSpec(  # needs stream: true, which no schema of one field says: _check_stream_options
        "stream_options",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {"include_usage": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}},
        },
        description="only with stream: true",
    ),
    FieldSpec(
        "max_tokens",
        {"type": "integer", "minimum": 1},
        "max_tokens must be a positive integer",
    ),
    FieldSpec(
        "temperature",
        {"type": "number", "minimum": TEMPERATURE_RANGE[0], "maximum": TEMPERATURE_RANGE[1]},
        f"temperature must be a number in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]",
    ),
    # two messages (out of [0, 1], then 0 itself): _check_top_p
    FieldSpec("top_p", {"type": "number", "exclusiveMinimum": 0, "maximum": TOP_P_MAX}),
    FieldSpec(
        "seed",
        {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        f"seed must be an integer in [0, {MAX_SEED}]",
    ),
    FieldSpec(
        "stop",
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "maxItems": MAX_STOP_STRINGS,
                    "items": {"type": "string", "minLength": 1},
                },
            ]
        },
        f"stop must be a string or a list of at most {MAX_STOP_STRINGS}",
    ),
    # vLLM's sampling extras (not OpenAI's)
    FieldSpec(
        "repetition_penalty",
        {"type": "number", "exclusiveMinimum": 0, "maximum": REPETITION_PENALTY_MAX},
        f"repetition_penalty must be a number in (0, {REPETITION_PENALTY_MAX:g}]",
        description="vLLM's: tokens of the prompt or the output, a positive logit divided by it, "
        "any other multiplied; 1 is off",
    ),
    FieldSpec(
        "min_tokens",
        {"type": "integer", "minimum": 0},
        "min_tokens must be an integer >= 0",
        description="vLLM's: no stop token nor stop string before this many tokens; at most "
        "max_tokens",
    ),
)

PROMPT_SPEC = FieldSpec(  # parsed into the list of prompts: _prompts
    "prompt",
    {
        "anyOf": [
            _ONE_PROMPT,
            _TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": _ONE_PROMPT},
            {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
        ]
    },
    required=True,
    nullable=False,
    description="text, token ids, or a list of either (a prompt each; prompts times n at most "
    "the max_n setting); choice j of prompt i has index i * n + j",
)

# a message of a chat request: chat_messages (its errors name the message)
MESSAGES_SPEC = FieldSpec(
    "messages",
    {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": MESSAGE_SCHEMA},
    required=True,
    nullable=False,
)

COMPLETION_SPECS = (*COMPLETION_ONLY_SPECS, *COMMON_SPECS, PROMPT_SPEC)
CHAT_SPECS = (*CHAT_ONLY_SPECS, *COMMON_SPECS, MESSAGES_SPEC)

COMPLETION_FIELDS = frozenset(spec.name for spec in COMPLETION_SPECS)
CHAT_FIELDS = frozenset(spec.name for spec in CHAT_SPECS)

# -- POST /tokenize and /detokenize: vLLM's bodies (vllm.entrypoints.serve.tokenize.protocol),
# field for field; a field of vLLM's that runs client input as code or names files
# (chat_template, chat_template_kwargs, media_io_kwargs, mm_processor_kwargs) is not one of ours

_OPTIONAL_MODEL = FieldSpec(
    "model",
    {"type": "string", "minLength": 1},
    "model must be a string (see GET /v1/models)",
    description="the served model's id (GET /v1/models); absent or null: the served model",
)
_ADD_SPECIAL_TOKENS = _typed("add_special_tokens", "boolean")
_RETURN_TOKEN_STRS = _typed("return_token_strs", "boolean")
_TOOLS = next(spec for spec in CHAT_ONLY_SPECS if spec.name == "tools")  # offered as in chat
TOKENIZE_PROMPT_SPEC = FieldSpec(
    "prompt",
    {"type": "string"},
    "prompt must be a string (or give messages instead)",
    required=True,
    nullable=False,
    description="text, encoded as /v1/completions encodes a text prompt",
)
TOKENIZE_COMPLETION_SPECS: tuple[FieldSpec, ...] = (
    _OPTIONAL_MODEL,
    _ADD_SPECIAL_TOKENS,
    _RETURN_TOKEN_STRS,
    TOKENIZE_PROMPT_SPEC,
)
TOKENIZE_CHAT_SPECS: tuple[FieldSpec, ...] = (
    _OPTIONAL_MODEL,
    _typed("add_generation_prompt", "boolean"),
    _unsupported(
        "continue_final_message",
        {"type": "boolean", "const": False},
        "continue_final_message is not supported",
    ),
    _ADD_SPECIAL_TOKENS,
    _RETURN_TOKEN_STRS,
    _TOOLS,
    MESSAGES_SPEC,
)
TOKEN_IDS_SPEC = FieldSpec(
    "tokens",
    {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "tokens must be a list of token ids (integers >= 0)",
    required=True,
    nullable=False,
    description="token ids, each in [0, the vocabulary size), at most max_model_len of them",
)
DETOKENIZE_SPECS: tuple[FieldSpec, ...] = (_OPTIONAL_MODEL, TOKEN_IDS_SPEC)

TOKENIZE_COMPLETION_FIELDS = frozenset(spec.name for spec in TOKENIZE_COMPLETION_SPECS)
TOKENIZE_CHAT_FIELDS = frozenset(spec.name for spec in TOKENIZE_CHAT_SPECS)
DETOKENIZE_FIELDS = frozenset(spec.name for spec in DETOKENIZE_SPECS)


def request_schema(specs: tuple[FieldSpec, ...]) -> dict[str, Any]:
    """The JSON Schema of a request body: exactly the fields of `specs`."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [spec.name for spec in specs if spec.required],
        "properties": {spec.name: spec.json_schema() for spec in specs},
    }


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
    "MESSAGE_FIELDS",
    "MESSAGE_SCHEMA",
    "TEXT_PART_SCHEMA",
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "FieldSpec",
    "Sampling",
    "TokenizeRequest",
    "conforms",
    "decode_body",
    "request_schema",
]
