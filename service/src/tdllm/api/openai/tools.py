"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls` on the tdllm engine: their
JSON Schemas (in the request table, so /openapi.json publishes them), their checks, and what a
valid request asks for (`ToolUse`), the constraint of `required` and named choices included.

A `required` or named `tool_choice` decodes under an llguidance grammar that writes only
``<tool_call>`` blocks (tool_prompt's format) whose arguments are valid under the tool's
`parameters`; `auto` decodes freely and the blocks are parsed out of the text afterwards
(tool_calls); `none` offers no tools (docs/api.md, "Tool calls on the tdllm engine").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from tdllm.api.errors import invalid
from tdllm.api.openai.json_schema import conforms
from tdllm.api.openai.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from tdllm.engine.structured import json_grammar, json_rule, lark_grammar

MAX_TOOLS = 64
# a constrained answer with parallel_tool_calls holds at most this many calls (a small model at
# temperature 1 could otherwise call until max_tokens)
MAX_PARALLEL_CALLS = 8
TOOL_NAME_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's
# a function without `parameters` takes none (OpenAI's reading)
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
FUNCTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": TOOL_NAME_PATTERN},
        "description": {"type": "string"},
        "parameters": {"type": "object"},
        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    },
}
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "function"],
    "properties": {"type": {"type": "string", "const": "function"}, "function": FUNCTION_SCHEMA},
}
TOOLS_SCHEMA: dict[str, Any] = {"type": "array", "maxItems": MAX_TOOLS, "items": TOOL_SCHEMA}
_NAMED_CHOICE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "function"],
    "properties": {
        "type": {"type": "string", "const": "function"},
        "function": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": {"type": "string"}},
        },
    },
}
TOOL_CHOICE_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, _NAMED_CHOICE]
}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # its JSON Schema (NO_PARAMETERS when not given)
    definition: dict[str, Any]  # as the client sent it: what the prompt lists

    def accepts(self, arguments: Any) -> bool:
        return bool(jsonschema_rs.validator_for(self.parameters).is_valid(arguments))


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers the model, and how it may answer."""

    tools: tuple[Tool, ...]
    choice: str  # "auto", "required", or "function" (one named)
    parallel: bool
    grammar: str | None  # llguidance's, for required and named choices; None: decode freely

    @property
    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition for t in self.tools]

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def check_tools(body: dict[str, Any]) -> None:
    """Each tool's shape, each mistake named by its path; names unique; each `parameters` a
    schema that both llguidance and the JSON Schema validator take."""
    value = body.get("tools")
    if value is None:
        return
    if not isinstance(value, list):
        raise invalid("tools must be a list of function tools", "tools")
    if len(value) > MAX_TOOLS:
        raise invalid(f"tools holds {len(value)} tools; at most {MAX_TOOLS} are allowed", "tools")
    seen: set[str] = set()
    for i, tool in enumerate(value):
        name = _check_tool(tool, f"tools[{i}]")
        if name in seen:
            param = f"tools[{i}].function.name"
            raise invalid(f"{param}: {name!r} is listed twice; tool names must be unique", param)
        seen.add(name)
    if not conforms(TOOLS_SCHEMA, value):  # what the checks above let through, if any
        raise invalid("tools must be a list of function tools", "tools")


def _check_tool(tool: Any, param: str) -> str:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise invalid(f'{param} must be {{"type": "function", "function": {{...}}}}', param)
    extra = sorted(set(tool) - {"type", "function"})
    if extra:
        raise invalid(f"unrecognized field of {param}: {extra[0]}", f"{param}.{extra[0]}")
    function = tool.get("function")
    param = f"{param}.function"
    if not isinstance(function, dict):
        raise invalid(f"{param} must be an object with name (and description, parameters)", param)
    name = check_named_definition(function, param, _FUNCTION_FIELDS)
    if "parameters" in function:
        _check_parameters(function["parameters"], f"{param}.parameters")
    return name


def check_named_definition(value: dict[str, Any], param: str, fields: Iterable[str]) -> str:
    """What OpenAI's named definitions share (a tool's `function`, a response format's
    `json_schema`): only `fields`, a name of 1-64 letters, digits, `_` or `-`, an optional
    string description and an optional boolean `strict`; the name."""
    extra = sorted(set(value) - set(fields))
    if extra:
        raise invalid(f"unrecognized field of {param}: {extra[0]}", f"{param}.{extra[0]}")
    name = value.get("name")
    if not (isinstance(name, str) and conforms({"pattern": TOOL_NAME_PATTERN}, name)):
        raise invalid(
            f"{param}.name must be 1 to 64 letters, digits, underscores or dashes", f"{param}.name"
        )
    if "description" in value and not isinstance(value["description"], str):
        raise invalid(f"{param}.description must be a string", f"{param}.description")
    if value.get("strict") is not None and not isinstance(value["strict"], bool):
        raise invalid(f"{param}.strict must be a bool", f"{param}.strict")
    return name


def _check_parameters(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON Schema (an object)", param)
    try:
        json_grammar(schema)  # the constraint of required and named choices
        jsonschema_rs.validator_for(schema)  # the check of calls parsed in auto mode
    except Exception as exc:  # either library's reason, whatever it raised
        raise invalid(f"{param} is not usable: {' '.join(str(exc).split())}", param) from None


def check_tool_choice(body: dict[str, Any]) -> None:
    """`tool_choice` after `tools` (checked first): a named function must be one of them, and
    `required` needs at least one."""
    value = body.get("tool_choice")
    if value is None or value in ("none", "auto"):
        return
    names = {t["function"]["name"] for t in body.get("tools") or []}
    if value == "required":
        if not names:
            raise invalid("tool_choice 'required' needs tools to choose from", "tool_choice")
        return
    if not conforms(_NAMED_CHOICE, value):
        raise invalid(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    name = value["function"]["name"]
    if name not in names:
        raise invalid(f"tool_choice names {name!r}, which is not one of tools", "tool_choice")


def tool_use(body: dict[str, Any]) -> ToolUse | None:
    """What a checked body asks of tools; None where the model is offered none (no tools, or
    tool_choice "none")."""
    listed = body.get("tools") or []
    choice = body.get("tool_choice") or ("auto" if listed else "none")
    if not listed or choice == "none":
        return None
    response_format = body.get("response_format") or {}
    if response_format.get("type") in ("json_object", "json_schema"):
        raise invalid(
            "response_format and tools both constrain the answer: give one of them "
            '(or tool_choice "none")',
            "response_format",
        )
    tools = tuple(
        Tool(t["function"]["name"], t["function"].get("parameters") or NO_PARAMETERS, t)
        for t in listed
    )
    parallel = body.get("parallel_tool_calls") is not False
    if choice == "auto":
        return ToolUse(tools, "auto", parallel, None)
    if choice == "required":
        return ToolUse(tools, "required", parallel, _grammar(tools, parallel))
    named = body["tool_choice"]["function"]["name"]
    chosen = tuple(t for t in tools if t.name == named)
    # one call of the named function, as OpenAI and vLLM answer a named choice
    return ToolUse(tools, "function", False, _grammar(chosen, parallel=False))


def _grammar(tools: tuple[Tool, ...], parallel: bool) -> str:
    """One ``<tool_call>`` block calling one of `tools` (up to MAX_PARALLEL_CALLS back to back
    when `parallel`), each call's arguments valid under its tool's schema. No newline between
    blocks: with one, the bundled model at temperature 1 went on calling until max_tokens in 2
    of 6 answers (a cut block); without, it ended after its calls in 6 of 6."""
    repeat = f" call{{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
    lines = [f"start: call{repeat}", "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    tail = json.dumps("}\n" + TOOL_CALL_CLOSE)
    for i, tool in enumerate(tools):
        head = json.dumps(f'{TOOL_CALL_OPEN}\n{{"name":"{tool.name}","arguments":')
        lines.append(f"call_{i}: {head} args_{i} {tail}")
        lines.append(f"args_{i}: {json_rule(tool.parameters)}")
    try:
        return lark_grammar("\n".join(lines))
    except ValueError as exc:
        raise invalid(f"tools cannot be constrained together: {exc}", "tools") from None
