"""The request bodies' fields, as one declarative table of `FieldSpec`s per body.

Each table (COMPLETION_SPECS, CHAT_SPECS, TOKENIZE_COMPLETION_SPECS, TOKENIZE_CHAT_SPECS,
DETOKENIZE_SPECS) gives each field its name, JSON Schema, whether it is required, and the 400 for
a value outside the schema. The parsers (`protocol`) check bodies against the tables, and the
OpenAPI document's request schemas are built from the same tables (tdllm.api.openapi_document),
so what GET /openapi.json documents is what is accepted. Both read this module, and it imports
neither of them.

Logprobs are typed here; whether they are offered at all, and how many alternatives, is the
model owner's `logprobs_policy` (off by default: they help rebuild the model's last layers),
checked by `logprobs.check_logprobs` before the body is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tdllm.api.openai.chat_messages import MAX_MESSAGES, MESSAGE_SCHEMA
from tdllm.api.openai.tools import TOOL_CHOICE_SCHEMA, TOOL_NAME_PATTERN, TOOLS_SCHEMA
from tdllm.engine.sampling import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    PENALTY_RANGE,
    REPETITION_PENALTY_MAX,
)

MAX_SEED = (1 << 63) - 1
LOGPROBS_POLICY_NOTE = "only where the logprobs_policy setting allows (default off: a 400)"
TEMPERATURE_RANGE = (0, 2)
TOP_P_MAX = 1  # and greater than 0


@dataclass(frozen=True)
class FieldSpec:
    """One field of a request body: its JSON Schema and how a value outside it is refused.

    `schema` describes a present, non-null value, in the subset of JSON Schema that
    `json_schema.conforms` reads (and the OpenAPI document publishes as is). With `refusal` set,
    the field is checked generically (`protocol._check_specs`): a value that does not conform is
    a 400 with that message, `param` the field and `code` given. Without it, a function of its
    own checks it (`protocol._CHECKS`, at its place in the table; prompt and messages last, as
    they are parsed): shapes that are converted, that depend on other fields or whose refusals
    name more than the field. The tests hold those to the schema value by value
    (tests/api/test_openapi_document.py).
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
# nested params in its refusals, the schema compiled: protocol._check_response_format
RESPONSE_FORMAT_SPEC = FieldSpec(
    "response_format",
    RESPONSE_FORMAT_SCHEMA,
    description="text, json_object (any JSON object) or json_schema (JSON valid under "
    "json_schema.schema): constrained decoding, compact JSON; an invalid schema is a 400 (on "
    "completions too, as vLLM's extension)",
)

# Each table is in the order the fields are checked (so that of two mistakes in one body, the
# same one is always reported). Fields without a refusal are checked in that order too, by the
# check named in their comment (a function of `protocol` where the name has no module), or last
# (prompt, messages: parsed into the request).

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
