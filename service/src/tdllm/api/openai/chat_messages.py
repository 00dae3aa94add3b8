"""The messages of a chat request: their JSON Schema (published as is in /openapi.json) and
their parsing into the plain {role, content} turns the chat template renders.

Three kinds of message: a system/developer/user/assistant turn with text; an assistant turn
with `tool_calls` (its content may be null or absent); a `tool` turn with the result of one
call (`tool_call_id`). Calls and results are written as text in the documented tool format
(tool_prompt), so every chat template renders them and the model reads its own calls back in
the form it writes them.
"""

from __future__ import annotations

from typing import Any

from tdllm.api.errors import ApiError, invalid
from tdllm.api.openai.json_schema import conforms
from tdllm.api.openai.strict_json import decode_json
from tdllm.api.openai.tool_prompt import call_text, result_text

MAX_MESSAGES = 256
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TOOL_ROLE = "tool"

TEXT_PART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"type": "string", "const": "text"}, "text": {"type": "string"}},
}
_TEXT = {"type": "string"}
_PARTS = {"type": "array", "items": TEXT_PART_SCHEMA}
_CONTENT = {"anyOf": [_TEXT, _PARTS]}
TOOL_CALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "const": "function"},
        "function": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
# a message of a chat request, one of three shapes (each mistake is refused by parse_messages,
# its errors naming the message)
MESSAGE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["role", "content"],
            "properties": {
                "role": {"type": "string", "enum": list(CHAT_ROLES)},
                "content": _CONTENT,
                "name": _TEXT,
            },
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["role", "tool_calls"],
            "properties": {
                "role": {"type": "string", "const": "assistant"},
                "content": {"anyOf": [_TEXT, _PARTS, {"type": "null"}]},
                "name": _TEXT,
                "tool_calls": {"type": "array", "items": TOOL_CALL_SCHEMA},
            },
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["role", "content", "tool_call_id"],
            "properties": {
                "role": {"type": "string", "const": TOOL_ROLE},
                "content": _CONTENT,
                "tool_call_id": _TEXT,
            },
        },
    ]
}
MESSAGE_FIELDS = frozenset(k for shape in MESSAGE_SCHEMA["anyOf"] for k in shape["properties"])
_ROLES = ", ".join([*CHAT_ROLES, TOOL_ROLE])


def parse_messages(value: Any) -> tuple[dict[str, str], ...]:
    """The conversation as {role, content} turns, tool calls and results written as text."""
    if not isinstance(value, list) or not value or len(value) > MAX_MESSAGES:
        raise invalid(f"messages must be a list of 1..{MAX_MESSAGES} messages", "messages")
    called: dict[str, str] = {}  # tool call id -> function name, from the assistant turns so far
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) - MESSAGE_FIELDS:
            raise invalid(f"{param} must be an object with role and content", param)
        role_name = message.get("role")
        if role_name == TOOL_ROLE:
            out.append(_tool_result(message, param, called))
        elif isinstance(role_name, str) and role_name in CHAT_ROLES:
            # a list or object role is unhashable: it must be a 400, not a TypeError (a 500)
            out.append(_turn(message, CHAT_ROLES[role_name], param, called))
        else:
            raise invalid(f"{param}.role must be one of {_ROLES}", param)
        if not conforms(MESSAGE_SCHEMA, message):  # what the checks above let through, if any
            raise invalid(f"{param} is not a message of its role's shape", param)
    return tuple(out)


def _turn(message: dict[str, Any], role: str, param: str, called: dict[str, str]) -> dict[str, str]:
    if "tool_call_id" in message:
        raise invalid(f"{param}.tool_call_id is a field of tool messages only", param)
    if "name" in message and not isinstance(message["name"], str):
        raise invalid(f"{param}.name must be a string", f"{param}.name")
    if "tool_calls" not in message:
        return {"role": role, "content": content_text(message.get("content"), param)}
    if role != "assistant":
        raise invalid(f"{param}.tool_calls is a field of assistant messages only", param)
    calls = message["tool_calls"]
    if not isinstance(calls, list):
        raise invalid(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
    text = message.get("content")
    blocks = []
    for j, call in enumerate(calls):
        name, arguments, call_id = _call(call, f"{param}.tool_calls[{j}]")
        called[call_id] = name
        blocks.append(call_text(name, arguments))
    # back to back, as the constrained decoding writes them (tools._grammar)
    parts = [content_text(text, param) if text is not None else "", "".join(blocks)]
    return {"role": role, "content": "\n".join(p for p in parts if p)}


def _call(call: Any, param: str) -> tuple[str, Any, str]:
    """(name, arguments, id) of a call in an assistant message; its arguments parsed where
    they are JSON, else kept as the string sent."""
    if not conforms(TOOL_CALL_SCHEMA, call):
        raise invalid(
            f'{param} must be {{"id": str, "type": "function", "function": {{"name": str, '
            '"arguments": str}}',
            param,
        )
    function = call["function"]
    try:  # within the request body's limits (depth, numbers), as the body itself
        arguments = decode_json(function["arguments"].encode())
    except ApiError:
        arguments = function["arguments"]
    return function["name"], arguments, call["id"]


def _tool_result(message: dict[str, Any], param: str, called: dict[str, str]) -> dict[str, str]:
    extra = sorted(set(message) - {"role", "content", "tool_call_id"})
    if extra:
        raise invalid(f"{param}.{extra[0]} is not a field of tool messages", param)
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise invalid(
            f"{param}.tool_call_id is required: the id of the call this result answers",
            f"{param}.tool_call_id",
        )
    content = content_text(message.get("content"), param)
    return {"role": "user", "content": result_text(content, called.get(call_id))}


def content_text(value: Any, param: str) -> str:
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
