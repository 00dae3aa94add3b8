"""Tool calls out of generated text: the ``<tool_call>`` blocks (tool_prompt's format) that
name an offered tool with arguments valid under its schema become OpenAI `tool_calls`; any
other text, a block that does not parse or validate included, stays content.

Streams send text as it comes until a block may begin (``<tool_call>``, or a prefix of it at
the end), then hold the rest and send the calls, with what else is left, in the choice's last
chunk (`CallStream`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from tdllm.api.openai.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, compact
from tdllm.api.openai.tools import ToolUse

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Answer:
    """A choice's text split into content (None when nothing is left) and tool calls."""

    content: str | None
    calls: tuple[dict[str, Any], ...]  # OpenAI's tool_calls items

    def finish_reason(self, finish: str) -> str:
        """OpenAI's: "tool_calls" when the model stopped having called tools."""
        return "tool_calls" if self.calls and finish == "stop" else finish


def split_calls(text: str, use: ToolUse) -> Answer:
    """The valid blocks of `text` as calls (only the first without parallel_tool_calls), the
    rest as content: stripped beside calls, else `text` as it is."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    at = 0
    for match in _BLOCK.finditer(text):
        found = _calls(match.group(1), use)
        if found is None:
            continue  # stays in the content
        kept.append(text[at : match.start()])
        at = match.end()
        calls += found
    kept.append(text[at:])
    if not calls:
        return Answer(text, ())
    if not use.parallel:
        calls = calls[:1]
    return Answer("".join(kept).strip() or None, tuple(calls))


def _calls(block: str, use: ToolUse) -> list[dict[str, Any]] | None:
    """The calls of one block: a call object or a list of them (SmolLM2's own format), every
    one valid; None when any is not."""
    try:  # the model's text: as deep as max_tokens allows, so a RecursionError is bad JSON too
        return _parsed_calls(json.loads(block, parse_constant=_not_json), use)
    except (ValueError, RecursionError):
        return None


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")  # NaN and Infinity, which Python's json reads


def _parsed_calls(parsed: Any, use: ToolUse) -> list[dict[str, Any]] | None:
    items = parsed if isinstance(parsed, list) and parsed else [parsed]
    out = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"name", "arguments"}:
            return None
        tool = use.tool(item["name"]) if isinstance(item["name"], str) else None
        if tool is None or not tool.accepts(item["arguments"]):
            return None
        out.append(_call(tool.name, item["arguments"]))
    return out


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": compact(arguments)},
    }


def stream_items(calls: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The calls as a stream's delta carries them: each whole, with its index."""
    return [{"index": i} | call for i, call in enumerate(calls)]


class CallStream:
    """One choice's text in a stream: what may be sent now, and the held rest at the end."""

    def __init__(self, use: ToolUse) -> None:
        self._use = use
        self._held = ""
        self._in_block = False  # a block began: everything after is held

    def feed(self, text: str) -> str:
        """The part of `text` (after what is held) that cannot be the start of a block."""
        if self._in_block:
            self._held += text
            return ""
        pending = self._held + text
        at = pending.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._in_block = True
            self._held = pending[at:]
            return pending[:at]
        keep = _open_prefix(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def finish(self) -> Answer:
        """The held text's calls and content (see `split_calls`)."""
        answer = split_calls(self._held, self._use)
        self._held = ""
        return answer


def _open_prefix(text: str) -> int:
    """The length of the longest end of `text` that begins TOOL_CALL_OPEN."""
    for size in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
