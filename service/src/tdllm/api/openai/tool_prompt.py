"""How tools, tool calls and tool results are written into a chat prompt (docs/api.md, "Tool
calls on the tdllm engine").

The format is Hermes/Qwen 2.5's, which SmolLM2's instruction data used: the tools are listed as
JSON inside ``<tools></tools>`` in the system message, the model answers with one
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block per call, and a tool's result
comes back in a user turn inside ``<tool_response></tool_response>``. Everything is plain text
in the model's own chat template, so any template renders it (a `tool` role would be refused by
templates that know only system, user and assistant). JSON is compact, as the constrained
decoding writes it (tdllm.api.openai.tool_calls), so a call in the history reads as the model
would have written it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_RESPONSE_OPEN = "<tool_response>"
_RESPONSE_CLOSE = "</tool_response>"

_INSTRUCTIONS = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it; `arguments` a parsed object (or, from a client's
    history, the string it sent when that is not JSON)."""
    return f"{TOOL_CALL_OPEN}\n{compact({'name': name, 'arguments': arguments})}\n{TOOL_CALL_CLOSE}"


def result_text(content: str, name: str | None) -> str:
    """A tool's result, named by the function whose call it answers when the history has it."""
    body = content if name is None else compact({"name": name, "content": content})
    return f"{_RESPONSE_OPEN}\n{body}\n{_RESPONSE_CLOSE}"


def tools_block(tools: Sequence[dict[str, Any]]) -> str:
    """The system prompt's tools section: each tool as the client defined it, one per line."""
    listed = "\n".join(compact(tool) for tool in tools)
    return _INSTRUCTIONS.format(tools=listed)


def with_tools(
    messages: Sequence[dict[str, str]], tools: Sequence[dict[str, Any]]
) -> list[dict[str, str]]:
    """`messages` with the tools offered: appended to the first system message, or in a system
    message of their own at the start."""
    block = tools_block(tools)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        return out
    return [{"role": "system", "content": block}, *out]
